"""DP-style clipped training of a small MLP on scikit-learn's digits with DistributedDataParallel.

Run it on two CPU processes with::

    torchrun --standalone --nproc-per-node 2 examples/ddp_training.py

Every step draws one global batch from a permutation that all ranks share and gives each rank
its part of it. Each rank records its examples' factored per-example gradients
(:class:`goodfellow.PerExampleGradients`, no per-example tensor), and
:func:`goodfellow.clipped_mean` with ``group=WORLD`` all-reduces the clipped sums, so every rank
steps along the clipped mean of the global batch. Two noise scales are printed: the one
:class:`goodfellow.distributed.NoiseScaleHook` reads off DDP's own gradient all-reduce (no
per-example gradients) and the one of the global batch's per-example gradients
(:func:`goodfellow.noise_scale_parts` with ``group=WORLD``), both smoothed over steps by the
same moving average. The global batch size is fixed (``--batch``): the steps are clipped
means, while ``CABS(group=...)`` steps along the plain mean gradient.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import goodfellow as gf
from goodfellow.distributed import NoiseScaleHook


def main() -> None:
    """Train on this rank's shares of the global batches and print the noise scales."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--max-norm", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--decay", type=float, default=0.9, help="of the moving averages")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    group = dist.group.WORLD

    digits = load_digits()  # bundled with scikit-learn: no download
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).to(device)  # (1797, 64)
    y = torch.tensor(digits.target).to(device)  # (1797,)

    torch.manual_seed(args.seed)  # the same initial weights on all ranks (DDP broadcasts anyway)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(device)
    model = DistributedDataParallel(net)
    noise = NoiseScaleHook(model, decay=args.decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # the same seed on every rank: the same permutation, so the ranks' shares are disjoint
    sampler = torch.Generator().manual_seed(args.seed)
    order, position, batch = torch.randperm(len(x), generator=sampler), 0, args.batch
    averages = torch.zeros(2, dtype=torch.float64, device=device)  # per-example S and |G|^2

    def full_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(net(x), y))

    if rank == 0:
        tqdm.write(f"world size {world}, backend {dist.get_backend()}, {len(x)} examples")
        tqdm.write(f"initial loss {full_loss():.4f}")
    bar = tqdm(range(args.steps), disable=rank != 0, desc="steps")
    for step in bar:
        if position + batch > len(order):  # a new pass over the data
            order, position = torch.randperm(len(x), generator=sampler), 0
        indices = order[position : position + batch][rank::world].to(device)  # this rank's share
        position += batch
        noise.batch_size = len(indices)

        optimizer.zero_grad()
        # recorded on the DDP model: its names carry the "module." prefix, like its parameters
        with gf.PerExampleGradients(model, loss_reduction="mean") as pe:
            losses = F.cross_entropy(model(x[indices]), y[indices], reduction="none")  # (b_r,)
            losses.mean().backward()  # DDP all-reduces the mean gradient; the hook reads it
        factors = gf.recorded_factors(pe)
        gf.assign_grads(model, gf.clipped_mean(factors, args.max_norm, group=group))
        optimizer.step()

        # the noise scale from the per-example gradients of the global batch, smoothed alike
        parts = torch.stack(gf.noise_scale_parts(factors, group=group)).double()  # (2,)
        averages.mul_(args.decay).add_(parts, alpha=1 - args.decay)
        trace, squared_norm = (averages / (1 - args.decay ** (step + 1))).tolist()
        loss_sum = torch.stack([losses.detach().sum(), losses.new_tensor(float(len(indices)))])
        dist.all_reduce(loss_sum, group=group)
        loss = float(loss_sum[0] / loss_sum[1])

        bar.set_postfix(batch=batch, noise_scale=f"{noise.noise_scale:.1f}")
        if rank == 0 and (step + 1) % args.log_every == 0:
            tqdm.write(
                f"step {step + 1:5d}  loss {loss:.4f}  batch {batch:4d}  "
                f"noise scale: hook {noise.noise_scale:8.1f}, per-example "
                f"{trace / squared_norm:8.1f}"
            )

    # every rank took the same steps: the largest difference of the parameters is 0
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)
    lowest = flat.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=group)
    if rank == 0:
        with torch.no_grad():
            accuracy = float((net(x).argmax(1) == y).float().mean())
        tqdm.write(f"final loss {full_loss():.4f}  train accuracy {accuracy:.3f}")
        tqdm.write(f"ranks agree: {bool((spread - lowest).abs().max() == 0)}")
    del noise, model  # DDP state goes before the group: gloo can abort at exit otherwise
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
