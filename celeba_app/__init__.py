"""celeba-fl: a federated "Smiling" classifier on CelebA with Flower, frozen MobileNetV2 and a
new head, with metrics per demographic group. See README.md."""
