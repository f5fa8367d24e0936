"""Ultralytics YOLOv5 (v6.x, P5) as ordinary MMDet components, registered on import.

``YOLOv5Detector`` (``SingleStageDetector``), ``YOLOv5CSPDarknet`` (backbone),
``YOLOv5PAFPN`` (neck), ``YOLOv5Head`` + ``YOLOv5BBoxCoder`` (anchor head with YOLOv5's
decoding and validation NMS) and ``YOLOv5Letterbox`` (test transform), in mmdet's
registries. ``convert_yolov5`` turns an official release ``.pt`` (or a plain state dict)
into weights for them; ``tools/convert_yolov5.py`` is its command line.
"""
from mmdet_regptq.yolov5.backbone import YOLOv5CSPDarknet
from mmdet_regptq.yolov5.convert import convert_yolov5, read_yolov5
from mmdet_regptq.yolov5.detector import YOLOv5Detector
from mmdet_regptq.yolov5.head import YOLOv5BBoxCoder, YOLOv5Head
from mmdet_regptq.yolov5.neck import YOLOv5PAFPN
from mmdet_regptq.yolov5.transforms import YOLOv5Letterbox
from mmdet_regptq.yolov5.variants import VARIANTS

__all__ = ['YOLOv5Detector', 'YOLOv5CSPDarknet', 'YOLOv5PAFPN', 'YOLOv5Head',
           'YOLOv5BBoxCoder', 'YOLOv5Letterbox', 'convert_yolov5', 'read_yolov5', 'VARIANTS']
