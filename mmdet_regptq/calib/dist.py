"""Data-parallel calibration over the processes of ``mmengine.dist`` (gloo on CPU, NCCL on GPU).

Under a distributed launcher (``torchrun``, ``tools/test.py --launcher pytorch``) the ranks
share the calibration instead of each repeating it:

* images: :func:`shard_indices` gives each rank a disjoint part of the seeded calibration
  subset (the same images in total as one process); the activation caches, the Fisher
  gradients and ``L_G`` then hold / see that rank's part only;
* scale initialisation: every activation observer is merged over the ranks
  (:func:`reduce_observer`: exact min / max, a sample drawn as one observer of all the
  images would draw it), and the scale searches on the merged samples are dealt out over
  the ranks (:class:`ObserverSharing`);
* training: :func:`all_reduce_grads` averages the gradients of the learned quantization
  parameters (rounding variables, activation steps, LLAQ parameters, AdaQuant's weights)
  over the ranks every iteration before the optimiser step; a statistic of the drawn
  batch that normalises a loss (the Fisher weights' mean) is summed with
  :func:`all_reduce_sum`;
* result: :func:`check_identical` raises unless every rank holds the same tensors; only
  the main process writes files (the others wait at :func:`barrier`).

Every function is a no-op when no process group is initialised or it has one rank, so a
single process calibrates exactly as without this module.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
from mmengine import dist as mdist
from torch import Tensor, nn

__all__ = ['world', 'is_active', 'shard_indices', 'rank_seed', 'all_reduce_grads',
           'all_reduce_sum', 'reduce_observer', 'from_main', 'broadcast_state',
           'check_identical', 'barrier', 'ObserverSharing', 'observer_sharing']


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    return mdist.get_dist_info()


def is_active() -> bool:
    """Whether calibration is shared by more than one process."""
    return world()[1] > 1


def shard_indices(indices: Sequence[int], batch_size: int, rank: int | None = None,
                  world_size: int | None = None) -> tuple[list[int], int]:
    """This rank's calibration images and batch size.

    One process makes batches of ``batch_size`` consecutive images of ``indices``. With
    ``W`` ranks and ``batch_size`` a multiple of ``W``, rank ``r`` takes the ``r``-th
    slice of ``batch_size / W`` images of every such batch: the ranks draw the same batch
    number at each iteration (same seed), so one iteration covers the images of one
    process's batch and the averaged gradient is that batch's. Otherwise whole batches
    are dealt round robin (rank ``r``: batches ``r, r + W, ...``; an iteration then sees
    ``W`` batches).

    Args:
        indices: the calibration images (dataset indices), in batch order.
        batch_size: images per batch of one process.
        rank: defaults to this process's rank.
        world_size: defaults to the number of processes.

    Returns:
        ``(this rank's indices, this rank's batch size)``; unchanged with one process.

    Raises:
        ValueError: a rank would get no image (fewer images than ranks or batches).
    """
    rank_now, size_now = world()
    rank = rank_now if rank is None else rank
    world_size = size_now if world_size is None else world_size
    indices = list(indices)
    if world_size == 1:
        return indices, batch_size
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if batch_size % world_size == 0:
        part = batch_size // world_size
        mine = [i for b in batches for i in b[rank * part:(rank + 1) * part]]
    else:
        part = batch_size
        mine = [i for b in batches[rank::world_size] for i in b]
    if not mine:
        raise ValueError(f'calib.num_images={len(indices)} leaves rank {rank} of {world_size} '
                         f'without a calibration image (batch_size={batch_size}); allowed: '
                         f'num_images >= {(world_size - 1) * part + 1} with {world_size} '
                         'processes')
    return mine, part


def rank_seed(seed: int) -> int:
    """Seed of the random masks (QDrop's drop) on this rank: ``seed`` on rank 0, another
    one on every other rank, so the ranks do not draw the same mask for their images."""
    rank = world()[0]
    return seed + 1_000_003 * rank


def all_reduce_grads(params: Sequence[Tensor]) -> None:
    """Average ``p.grad`` over the ranks (in place), one collective for all ``params``.

    A rank whose loss did not reach a parameter (``grad`` is ``None``) adds zeros; a
    parameter that no rank reached keeps ``grad=None`` (the optimiser skips it, as with
    one process). Dividing by the number of ranks makes the result the gradient of the
    mean of the ranks' losses.
    """
    rank, size = world()
    if size == 1 or not params:
        return
    device = params[0].device
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
             for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([t.to(device) for t in parts] + [present])
    mdist.all_reduce(flat, op='sum')
    offset = 0
    for p, seen in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        if seen > 0:
            mean = (flat[offset:offset + n] / size).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = mean.to(p.device)
            else:
                p.grad.copy_(mean)
        offset += n


def all_reduce_sum(values: Tensor) -> Tensor:
    """``values`` summed over the ranks (a new tensor; ``values`` itself with one rank)."""
    if not is_active():
        return values
    out = values.detach().clone()
    mdist.all_reduce(out, op='sum')
    return out


def reduce_observer(observer: Any) -> None:
    """Merge an activation observer over the ranks (every rank ends with the same one).

    ``observer`` has ``state()`` and ``merge(states)``
    (:class:`~mmdet_regptq.quant.observers.ActivationObserver`); the states travel with
    ``all_gather_object``. Call on every rank, for the same observers in the same order.
    """
    if not is_active():
        return
    state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v)
             for k, v in observer.state().items()}
    observer.merge(mdist.all_gather_object(state))


def from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every rank (a decision only it can make, e.g. to
    reuse a finished ``quantized.pth`` in its work_dir)."""
    if not is_active():
        return obj
    box = [obj]
    mdist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(module: nn.Module) -> None:
    """Give every rank the main process's ``module.state_dict()`` (e.g. after it restored
    a partial calibration the others have no file of). Loaded with ``load_state_dict``, so
    the quantizers' own load hooks run (shapes set on initialisation, host-side flags)."""
    if not is_active():
        return
    main = world()[0] == 0
    state = from_main({k: v.detach().cpu() for k, v in module.state_dict().items()}
                      if main else None)
    if not main:
        module.load_state_dict(state)


def _digest(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def check_identical(module: nn.Module, what: str = 'the calibrated model') -> None:
    """Raise unless every rank holds bit-identical tensors in ``module.state_dict()``.

    Compares one SHA-256 per rank first (``all_gather_object``); on a mismatch, the
    digests per tensor, to name the tensors that differ.

    Raises:
        RuntimeError: naming the ranks' differing tensors (at most 5).
    """
    if not is_active():
        return
    digests = {name: _digest(t) for name, t in module.state_dict().items()}
    total = hashlib.sha256(''.join(f'{k}:{v};' for k, v in digests.items()).encode()).hexdigest()
    totals = mdist.all_gather_object(total)
    if len(set(totals)) == 1:
        return
    others = mdist.all_gather_object(digests)
    differ = sorted({name for d in others for name in set(d) ^ set(digests)} |
                    {name for d in others for name, v in d.items()
                     if name in digests and digests[name] != v})
    raise RuntimeError(f'data-parallel calibration: the {len(totals)} ranks ended with '
                       f'different tensors in {what} ({len(differ)} entries differ, e.g. '
                       f'{differ[:5]}); the ranks must run the same units with the same '
                       'settings')


def barrier() -> None:
    """Wait for every rank (e.g. while the main process writes ``quantized.pth``)."""
    if is_active():
        mdist.barrier()


class ObserverSharing:
    """``init_activation_quantizers(parallel=...)`` over the ranks: each observer merged
    (:func:`reduce_observer`), the scale searches dealt out round robin (job ``i`` on rank
    ``i mod W``), their quantizers' states exchanged with one ``all_gather_object``."""

    def merge(self, observer: Any) -> None:
        reduce_observer(observer)

    def run(self, jobs: Sequence[tuple[nn.Module, Callable[[], None]]]) -> None:
        rank, size = world()
        mine = {}
        for i, (module, job) in enumerate(jobs):
            if i % size == rank:
                job()
                mine[i] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        for states in mdist.all_gather_object(mine):
            for i, state in states.items():
                if i % size != rank:
                    jobs[i][0].load_state_dict(state)


def observer_sharing() -> ObserverSharing | None:
    """The ``parallel`` argument of ``init_activation_quantizers``: an
    :class:`ObserverSharing` when the calibration is shared, else ``None``."""
    return ObserverSharing() if is_active() else None
