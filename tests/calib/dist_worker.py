"""One data-parallel calibration of the toy model per method config; ``test_dist.py`` runs
it under ``torchrun`` (gloo).

    python -m torch.distributed.run --nproc_per_node=2 tests/calib/dist_worker.py OUT CFGS

``CFGS`` is a JSON list of method configs. Writes ``OUT/<i>_rank<r>.pt`` (the calibrated
state of config ``i``) and ``OUT/rank<r>.json``: whether ``broadcast_state`` restored the
quantizers rank 1 had reset, and what ``check_identical`` said when one rank's tensor was
changed afterwards.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calib_toy import forward_fn, make_batches, make_float, make_quant, output_fn  # noqa: E402

from mmdet_regptq.calib import build_method  # noqa: E402
from mmdet_regptq.calib import dist as calib_dist  # noqa: E402


def rank_batches(batch_size: int = 2) -> list:
    """This rank's batches of the 8 toy images that one process batches by ``batch_size``
    (what the calibration loader gives each rank)."""
    images = torch.cat(make_batches(4))
    indices, size = calib_dist.shard_indices(range(len(images)), batch_size)
    return [images[indices[i:i + size]] for i in range(0, len(indices), size)]


def main() -> None:
    out, cfgs = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank = calib_dist.world()[0]
    model = None
    for i, cfg in enumerate(cfgs):
        model = make_quant(make_float())
        build_method(cfg).calibrate(model, rank_batches(), forward_fn, output_fn=output_fn)
        calib_dist.check_identical(model)
        torch.save(model.state_dict(), out / f'{i}_rank{rank}.pt')
    if rank == 1:   # rank 1 forgets its activation scales; broadcast_state restores them
        for m in model.modules():
            if hasattr(m, 'initialized') and hasattr(m, 'scale'):
                m.scale.data.fill_(1.0)
                m.initialized.fill_(False)
                m._is_init = False
    calib_dist.broadcast_state(model)
    calib_dist.check_identical(model)
    restored = all(m.is_initialized() for m in model.modules() if hasattr(m, 'is_initialized'))
    with torch.no_grad():   # one rank changes a tensor: every rank must refuse
        if rank == 1:
            next(iter(model.parameters())).add_(1.0)
    try:
        calib_dist.check_identical(model)
        report = {'mismatch': None, 'restored': restored}
    except RuntimeError as err:
        report = {'mismatch': str(err), 'restored': restored}
    (out / f'rank{rank}.json').write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
