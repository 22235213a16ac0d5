"""Layout data: the synthetic benchmark domain and COCO-format layout loading."""
