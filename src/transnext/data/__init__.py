"""Datasets, transforms and class-name lists for classification jobs."""
from .fashion_mnist import DataError, TensorBatches, load_fashion_mnist, read_idx
from .folder import ImageFolder, check_image, load_image
from .names import (default_class_names, fashion_mnist_classes, imagenet_a_wnids,
                    imagenet_c_alexnet_errors, imagenet_classes, imagenet_r_wnids,
                    imagenet_wnids)
from .transforms import eval_transform, train_transform

__all__ = [
    "DataError", "TensorBatches", "load_fashion_mnist", "read_idx", "ImageFolder",
    "check_image", "load_image", "default_class_names", "fashion_mnist_classes",
    "imagenet_a_wnids", "imagenet_c_alexnet_errors", "imagenet_classes",
    "imagenet_r_wnids", "imagenet_wnids", "eval_transform", "train_transform",
]
