"""Dense tasks (segmentation; detection later) on maintained libraries' heads."""
