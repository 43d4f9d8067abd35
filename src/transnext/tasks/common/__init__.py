"""What the dense tasks share: the backbone adapter and the Fashion-MNIST mosaic sets."""
