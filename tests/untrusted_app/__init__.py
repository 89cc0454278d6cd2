"""A copy of this Flower app whose ClientApp is ``untrusted_client.py``'s (tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLIENTAPP = 'clientapp = "celeba_app.client_app:app"'


def copy_app(dest: Path, alter: dict[int, tuple[str, str]], mode: str = "attack") -> Path:
    """The app in ``dest`` (created): this project's pyproject.toml with ``clientapp`` pointing
    at untrusted_client.py, whose partitions ``alter`` ({partition id: (phase, attack)}) alter
    that phase's reply (``mode="attack"``) or answer it with an error (``mode="error"``)."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    pyproject = (ROOT / "pyproject.toml").read_text()
    if CLIENTAPP not in pyproject:
        raise RuntimeError(f"pyproject.toml has no line {CLIENTAPP}")
    (dest / "pyproject.toml").write_text(pyproject.replace(CLIENTAPP, 'clientapp = "untrusted_client:app"'))
    source = (HERE / "untrusted_client.py").read_text()
    source = source.replace('MODE = "attack"', f"MODE = {mode!r}").replace("ALTER = {}", f"ALTER = {alter!r}")
    (dest / "untrusted_client.py").write_text(source)
    return dest
