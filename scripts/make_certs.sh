#!/usr/bin/env bash
# Make the TLS certificates and SuperNode keys of the `local-deployment-tls` federation.
#
#   scripts/make_certs.sh [--force] [DIR [N]]     DIR: certificates/ (default), N: 3 (default)
#
# Writes into DIR (refuses if DIR exists and is not empty, unless --force is given):
#   ca.key            CA private key. Keep it secret; needed only to sign new certificates.
#   ca.crt            CA certificate: `flower-superlink --ssl-ca-certfile`,
#                     `flower-supernode --root-certificates`, and `root-certificates` of the
#                     federation in pyproject.toml (read by `flwr run` / `flwr supernode ...`).
#   server.key        SuperLink TLS private key: `flower-superlink --ssl-keyfile`.
#   server.pem        SuperLink TLS certificate, signed by ca.crt, valid for IP:127.0.0.1 and
#                     DNS:localhost: `flower-superlink --ssl-certfile`.
#   supernode_<i>     SuperNode i's EC P-384 private key (OpenSSH format), i = 0..N-1:
#                     `flower-supernode --auth-supernode-private-key`.
#   supernode_<i>.pub Its public key (OpenSSH format, `ecdsa-sha2-nistp384 ...`):
#                     `flwr supernode register DIR/supernode_<i>.pub . local-deployment-tls`
#                     (SuperLink started with `--enable-supernode-auth`).
#
# Needs openssl, and ssh-keygen (or else a python3 with the `cryptography` package, which
# Flower installs) for the OpenSSH-format keys that Flower reads. Self-signed, for a test or
# a small private federation; keys are written with mode 600.
set -euo pipefail

usage() { echo "usage: $0 [--force] [DIR [N]]   (DIR default: certificates, N default: 3)" >&2; }

force=0
positional=()
for arg in "$@"; do
    case "$arg" in
        --force|-f) force=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage; exit 2 ;;
        *) positional+=("$arg") ;;
    esac
done
dir="${positional[0]:-certificates}"
n="${positional[1]:-3}"
days="${CERT_DAYS:-365}"

if ! [[ "$n" =~ ^[0-9]+$ ]]; then
    echo "make_certs.sh: N must be a non-negative integer, got '$n'" >&2; exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
if [[ -e "$dir" && ! -d "$dir" ]]; then
    echo "make_certs.sh: '$dir' exists and is not a folder" >&2; exit 1
fi
if [[ -d "$dir" && -n "$(ls -A "$dir")" && "$force" -eq 0 ]]; then
    echo "make_certs.sh: '$dir' exists and is not empty; not overwriting it (use --force to replace its certificates and keys)" >&2
    exit 1
fi

umask 077
mkdir -p "$dir"
tmp="$(mktemp -d "$dir/.make_certs.XXXXXX")"   # same file system: files are moved in at the end
trap 'rm -rf "$tmp"' EXIT

# OpenSSH-format EC P-384 key pair: $1 private key path ($1.pub public key), $2 comment.
make_ssh_key() {
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$2" -f "$1"
    else
        "${PYTHON:-python3}" - "$1" "$2" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
path, comment = sys.argv[1:]
key = ec.generate_private_key(ec.SECP384R1())
open(path, "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
pub = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
open(path + ".pub", "wb").write(pub + b" " + comment.encode() + b"\n")
EOF
    fi
}

cat > "$tmp/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = celeba-fl
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

# CA (EC P-384, self-signed)
openssl ecparam -name secp384r1 -genkey -noout -out "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha384 -days "$days" -config "$tmp/openssl.cnf" \
    -extensions v3_ca -subj "/CN=celeba-fl CA" -out "$tmp/ca.crt"

# SuperLink certificate (EC P-384), signed by the CA
openssl ecparam -name secp384r1 -genkey -noout -out "$tmp/server.key"
openssl req -new -key "$tmp/server.key" -config "$tmp/openssl.cnf" -subj "/CN=localhost" \
    -out "$tmp/server.csr"
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha384 -days "$days" \
    -extfile "$tmp/openssl.cnf" -extensions v3_server -out "$tmp/server.pem" 2>/dev/null
openssl verify -CAfile "$tmp/ca.crt" "$tmp/server.pem" >/dev/null

# SuperNode authentication keys
for ((i = 0; i < n; i++)); do
    make_ssh_key "$tmp/supernode_$i" "celeba-fl supernode_$i"
done

chmod 644 "$tmp/ca.crt" "$tmp/server.pem"
((n > 0)) && chmod 644 "$tmp"/supernode_*.pub
rm -f "$tmp/server.csr" "$tmp/openssl.cnf"

# Replace what an earlier run wrote (only with --force: otherwise the folder was empty).
rm -f "$dir"/ca.key "$dir"/ca.crt "$dir"/server.key "$dir"/server.pem "$dir"/supernode_*
mv "$tmp"/* "$dir"/
echo "make_certs.sh: wrote CA, SuperLink certificate and $n SuperNode key pair(s) to $dir/"
