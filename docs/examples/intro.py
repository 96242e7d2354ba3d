"""TorchRec's introduction, written against shardrec.

Only the import differs from TorchRec's tutorial: ``import shardrec as torchrec``. It runs on CPU
with gloo by default; ``--cuda`` runs it as the tutorial is written for GPUs (NCCL,
``device=torch.device("cuda")``).

    python docs/examples/intro.py          # CPU, gloo
    python docs/examples/intro.py --cuda   # one GPU, NCCL
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist

import shardrec as torchrec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cuda", action="store_true", help="run on one GPU with NCCL, as TorchRec's tutorial does"
    )
    args = parser.parse_args()
    device = torch.device("cuda") if args.cuda else torch.device("cpu")

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend="nccl" if args.cuda else "gloo")

    # Two tables of 4096 rows, built on the meta device: nothing is allocated until
    # DistributedModelParallel places each table on its rank.
    ebc = torchrec.EmbeddingBagCollection(
        device="meta",
        tables=[
            torchrec.EmbeddingBagConfig(
                name="product_table",
                embedding_dim=64,
                num_embeddings=4096,
                feature_names=["product"],
                pooling=torchrec.PoolingType.SUM,
            ),
            torchrec.EmbeddingBagConfig(
                name="user_table",
                embedding_dim=64,
                num_embeddings=4096,
                feature_names=["user"],
                pooling=torchrec.PoolingType.SUM,
            ),
        ],
    )
    model = torchrec.distributed.DistributedModelParallel(ebc, device=device)
    print(model)
    print(model.plan)

    # Three samples: "product" has ids [101, 202], [] and [303]; "user" has [404], [505], [606].
    mb = torchrec.KeyedJaggedTensor(
        keys=["product", "user"],
        values=torch.tensor([101, 202, 303, 404, 505, 606]).to(device),
        lengths=torch.tensor([2, 0, 1, 1, 1, 1], dtype=torch.int64).to(device),
    )
    print(mb.to(torch.device("cpu")))

    pooled_embeddings = model(mb)
    print(pooled_embeddings)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
