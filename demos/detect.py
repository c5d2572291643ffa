"""Detect objects with a trtnet YOLOv5 engine: the same as `python -m trtnet.detect`.

    python demos/detect.py yolov5n ../shared/data/images/ --out runs/detect
    python demos/detect.py weights/yolov5s.fp16.640.engine video.mp4 --conf 0.4
    python demos/detect.py yolov5n 0 --show          # camera 0

The Python API underneath, for your own programs:

    from trtnet.api import Detector
    with Detector("yolov5n") as detector:
        for result in detector.detect(["bus.jpg", "zidane.jpg"]):
            print(result.labels, result.boxes)        # boxes: x1, y1, x2, y2 in image pixels
            cv2.imwrite("annotated.jpg", result.draw())
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from trtnet.detect import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
