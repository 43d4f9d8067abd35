"""COCO detection and instance segmentation with TransNeXt backbones (Mask R-CNN on
torchvision; DINO to follow), without mmcv/mmdet."""
