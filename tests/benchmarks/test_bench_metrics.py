"""bbox_metrics: AP of a detector that predicts nothing is 0, not a KeyError."""
import pytest

from mmdet_regptq.bench.metrics import bbox_metrics


def test_reads_the_coco_bbox_keys():
    metrics = {'coco/bbox_mAP': 0.5, 'coco/bbox_mAP_50': 0.7, 'coco/bbox_mAP_75': 0.4,
               'coco/bbox_mAP_s': 0.1}
    assert bbox_metrics(metrics) == {'bbox_mAP': 0.5, 'bbox_mAP_50': 0.7,
                                     'bbox_mAP_75': 0.4}


def test_empty_result_is_zero_ap():
    # CocoMetric's dict when no test image got a single box
    assert bbox_metrics({}) == {'bbox_mAP': 0.0, 'bbox_mAP_50': 0.0, 'bbox_mAP_75': 0.0}


def test_partial_keys_fail_with_the_names():
    with pytest.raises(KeyError, match='coco/bbox_mAP_75'):
        bbox_metrics({'coco/bbox_mAP': 0.5, 'coco/bbox_mAP_50': 0.7})
