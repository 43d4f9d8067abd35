"""COCO detection and instance segmentation with TransNeXt backbones (Mask R-CNN on
torchvision; DINO as mmdet 3.0 computes it), without mmcv/mmdet."""
