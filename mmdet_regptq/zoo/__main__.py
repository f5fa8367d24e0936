"""``python -m mmdet_regptq.zoo CONFIG --result JSON``: the sweep's child process (one
config in this process; see :mod:`mmdet_regptq.zoo.probe`)."""
from mmdet_regptq.zoo.probe import main

main()
