"""``YOLOv5Detector``: mmdet's single-stage detector that refuses the wrong YOLOv5 size."""
from __future__ import annotations

from mmdet.models.detectors.single_stage import SingleStageDetector
from mmdet.registry import MODELS

from mmdet_regptq.yolov5.variants import config_name, describe_state_dict

__all__ = ['YOLOv5Detector']


@MODELS.register_module()
class YOLOv5Detector(SingleStageDetector):
    """YOLOv5 as an mmdet ``SingleStageDetector`` (backbone, neck, head; no extra logic).

    Loading a state dict of another size or class count fails at once with a message
    naming the config that matches the checkpoint (mmengine would otherwise skip the
    mismatched tensors with a warning and evaluate random weights).
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        theirs = describe_state_dict(state_dict, prefix)
        if theirs is not None:
            ours = describe_state_dict(self.state_dict())
            keys = ('stem_channels', 'stage1_blocks', 'stage3_blocks', 'num_classes')
            if ours is not None and any(theirs[k] != ours[k] for k in keys):
                raise ValueError(
                    'YOLOv5 checkpoint does not match the config: checkpoint '
                    f'{_shape_text(theirs)}, config {_shape_text(ours)}; use '
                    f'{config_name(theirs["size"])}'
                    + (f' with num_classes={theirs["num_classes"]}'
                       if theirs['num_classes'] != 80 else ''))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _shape_text(desc: dict) -> str:
    size = f'yolov5{desc["size"]}' if desc['size'] else 'unknown size'
    return (f'{size} (stem {desc["stem_channels"]} channels, C3 blocks {desc["stage1_blocks"]}/'
            f'{desc["stage3_blocks"]}, {desc["num_classes"]} classes)')
