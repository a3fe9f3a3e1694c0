"""Train the *reference* HSTU / SASRec (generative-recommenders' research path) on our ml-100k split.

The issue asks that our HSTU numbers be compared with the reference implementation on the same
data. This script imports the reference's own modules from a checkout you point it to (it never
vendors them) and runs its training step exactly as its `research/trainer/train.py` does: the
target id scattered into `past_ids` at `past_lengths`, the encoder over N = 200 + 11 slots,
`SampledSoftmaxLoss` with `LocalNegativesSampler` (128 uniform negatives per position, L2-normalised,
temperature 0.05), AdamW(lr 1e-3, betas (0.9, 0.98), wd 0) over all parameters, and the ML-1M gin
hyperparameters (D 50, 2 blocks, 1 head, dqk = dv = 50, dropout 0.2; SASRec FFN 50 relu).

What is ours, so that both sides see the same users, windows and metrics:
  - data: `SplitReader` windows of configs/ml100k_hstu.yaml's sequences (leave-one-out with a
    validation item; the reference has no validation split, #61), batch 128, the same per-epoch
    shuffle; ratings are not in the sequence file and are passed as zeros (only the reference's
    rating>=4 eval slices read them, and those are not reported);
  - evaluation: the user embedding is the reference's own `model.encode(...)`, ranked against all
    corpus items by our `target_ranks` (history window filtered out, exact ranks). Its `eval.py`
    cannot run here: with 1682 items (< its top-k cap 2500) removing the seen ids breaks its
    `.view(-1, k)`; ML-1M's 3706 items do not hit that.
  - early stopping on valid NDCG@10 with the same budget as our runs; test at the best valid epoch.
Anomaly detection, which train.py turns on as a debugging aid, is left off (it changes no number).

    git clone https://github.com/meta-recsys/generative-recommenders /path/gr   # research/ path
    pip install gin-config
    .venv/bin/python benchmarks/hstu_reference.py --reference /path/gr --module HSTU --seed 0 --out runs/ref/hstu-s0
    .venv/bin/python benchmarks/hstu_collect.py runs/ref/hstu-s0 ... --epochs 100 --patience 15

The run directory gets config.json, metrics_history.jsonl, best.json and metrics.json in the layout
of our retrieval trainer, so hstu_collect.py tables both side by side (encoders `ref-hstu`, `ref-sasrec`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trec_rank.retrieval.config import load_retrieval_config  # noqa: E402
from trec_rank.retrieval.data import SplitReader, Window, read_sequences  # noqa: E402
from trec_rank.retrieval.evaluate import corpus_columns  # noqa: E402
from trec_rank.retrieval.metrics import RankingMetrics, target_ranks  # noqa: E402

GIN = {  # configs/ml-1m/{hstu,sasrec}-sampled-softmax-n128-final.gin of the reference
    "HSTU": ["hstu_encoder.num_blocks = 2", "hstu_encoder.num_heads = 1", "hstu_encoder.dqk = 50",
             "hstu_encoder.dv = 50", "hstu_encoder.linear_dropout_rate = 0.2"],
    "SASRec": ["sasrec_encoder.num_blocks = 2", "sasrec_encoder.num_heads = 1", "sasrec_encoder.ffn_dropout_rate = 0.2",
               "sasrec_encoder.ffn_hidden_dim = 50", 'sasrec_encoder.ffn_activation_fn = "relu"'],
}
MAX_SEQ_LEN, GR_OUTPUT_LENGTH, DIM, DROPOUT, BATCH = 200, 10, 50, 0.2, 128  # train.py's ML-1M settings


class RowWiseAdagrad(torch.optim.Optimizer):
    """fbgemm's row-wise Adagrad (our item table's optimizer) for one dense [rows, D] parameter.

    state[row] += mean(g[row]^2); w[row] -= lr * g[row] / (sqrt(state[row]) + eps). Rows without a
    gradient keep their state and weights, as in the sparse kernel.
    """

    def __init__(self, params, lr: float, eps: float = 1e-8) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self) -> None:  # noqa: D102
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                acc = self.state[w].setdefault("sum", torch.zeros(w.shape[0], 1))
                acc += w.grad.pow(2).mean(1, keepdim=True)
                w -= group["lr"] * w.grad / (acc.sqrt() + group["eps"])


def build(module: str, num_items: int, corpus: np.ndarray, item_lr: float):  # noqa: ANN201 - reference types
    """The reference model, loss, sampler and optimizer, constructed as its train.py constructs them.

    item_lr > 0 swaps only the optimizer of the item table for ours (row-wise Adagrad at that lr,
    AdamW on the rest): a control separating the implementation from that one hyperparameter.
    """
    import gin
    from generative_recommenders.research.modeling.sequential.autoregressive_losses import LocalNegativesSampler
    from generative_recommenders.research.modeling.sequential.embedding_modules import LocalEmbeddingModule
    from generative_recommenders.research.modeling.sequential.encoder_utils import get_sequential_encoder
    from generative_recommenders.research.modeling.sequential.input_features_preprocessors import (
        LearnablePositionalEmbeddingInputFeaturesPreprocessor,
    )
    from generative_recommenders.research.modeling.sequential.losses.sampled_softmax import SampledSoftmaxLoss
    from generative_recommenders.research.modeling.sequential.output_postprocessors import (
        L2NormEmbeddingPostprocessor,
    )
    from generative_recommenders.research.modeling.similarity_utils import get_similarity_function

    gin.parse_config(GIN[module])
    interaction, _ = get_similarity_function(module_type="DotProduct", query_embedding_dim=DIM, item_embedding_dim=DIM)
    model = get_sequential_encoder(
        module_type=module, max_sequence_length=MAX_SEQ_LEN, max_output_length=GR_OUTPUT_LENGTH + 1,
        embedding_module=LocalEmbeddingModule(num_items=num_items, item_embedding_dim=DIM),
        interaction_module=interaction,
        input_preproc_module=LearnablePositionalEmbeddingInputFeaturesPreprocessor(
            max_sequence_len=MAX_SEQ_LEN + GR_OUTPUT_LENGTH + 1, embedding_dim=DIM, dropout_rate=DROPOUT),
        output_postproc_module=L2NormEmbeddingPostprocessor(embedding_dim=DIM, eps=1e-6),
        verbose=False)
    loss = SampledSoftmaxLoss(num_to_sample=128, softmax_temperature=0.05, model=model, activation_checkpoint=False)
    sampler = LocalNegativesSampler(num_items=num_items, item_emb=model._embedding_module._item_emb,
                                    all_item_ids=corpus.tolist(), l2_norm=True, l2_norm_eps=1e-6)
    table = model._embedding_module._item_emb.weight
    rest = [w for w in model.parameters() if w is not table]
    adamw = torch.optim.AdamW(rest if item_lr > 0 else model.parameters(), lr=1e-3, betas=(0.9, 0.98),
                              weight_decay=0.0)
    return model, loss, sampler, ([adamw, RowWiseAdagrad([table], item_lr)] if item_lr > 0 else [adamw])


def features(window: Window):  # noqa: ANN201 - reference SequentialFeatures
    """Our window (history..., target) -> the reference's row dict -> its own feature builder.

    Row layout of its DatasetV2: historical_* [B, 200] oldest first, zero padded on the right.
    """
    from generative_recommenders.research.modeling.sequential.features import movielens_seq_features_from_row

    lengths = window.lengths - 1  # history length; the last token is the target
    b = len(lengths)
    ids, ts = np.zeros((b, MAX_SEQ_LEN), np.int64), np.zeros((b, MAX_SEQ_LEN), np.int64)
    ends = np.cumsum(window.lengths)
    starts = ends - window.lengths
    for r in range(b):
        ids[r, :lengths[r]] = window.items[starts[r]:ends[r] - 1]
        ts[r, :lengths[r]] = window.timestamps[starts[r]:ends[r] - 1]
    row = {"history_lengths": torch.from_numpy(lengths), "historical_ids": torch.from_numpy(ids),
           "historical_ratings": torch.zeros(b, MAX_SEQ_LEN, dtype=torch.long),
           "historical_timestamps": torch.from_numpy(ts),
           "target_ids": torch.from_numpy(window.items[ends - 1]), "target_ratings": torch.zeros(b, dtype=torch.long),
           "target_timestamps": torch.from_numpy(window.timestamps[ends - 1])}
    seq, target_ids, _ = movielens_seq_features_from_row(row, device="cpu", max_output_length=GR_OUTPUT_LENGTH + 1)
    return seq, target_ids


def train_epoch(model, loss_fn, sampler, opts, reader: SplitReader, epoch: int) -> float:  # noqa: ANN001
    """One pass of train.py's inner loop; returns the mean loss."""
    model.train()
    losses = []
    for _, window in reader.batches(epoch):
        seq, target_ids = features(window)
        seq.past_ids.scatter_(dim=1, index=seq.past_lengths.view(-1, 1), src=target_ids.view(-1, 1))
        for opt in opts:
            opt.zero_grad()
        emb = model.get_item_embeddings(seq.past_ids)
        out = model(past_lengths=seq.past_lengths, past_ids=seq.past_ids, past_embeddings=emb,
                    past_payloads=seq.past_payloads)
        sampler._item_emb = model._embedding_module._item_emb
        sup = seq.past_ids[:, 1:]
        loss, _ = loss_fn(lengths=seq.past_lengths, output_embeddings=out[:, :-1, :], supervision_ids=sup,
                          supervision_embeddings=emb[:, 1:, :], supervision_weights=(sup != 0).float(),
                          negatives_sampler=sampler, **seq.past_payloads)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(model, reader: SplitReader, corpus: np.ndarray, ks: list[int]) -> dict[str, float]:  # noqa: ANN001
    """The reference's user embedding (`encode`, the output at the last history position) ranked by our metrics."""
    model.eval()
    table = torch.nn.functional.normalize(model.get_item_embeddings(torch.from_numpy(corpus)), dim=-1,
                                          eps=1e-6)  # [C, D]
    column = corpus_columns(corpus, torch.device("cpu"))
    metrics = RankingMetrics(ks, torch.device("cpu"))
    for _, window in reader.batches():
        seq, target_ids = features(window)
        user = model.encode(past_lengths=seq.past_lengths, past_ids=seq.past_ids,
                            past_embeddings=model.get_item_embeddings(seq.past_ids), past_payloads=seq.past_payloads)
        rows, cols = torch.nonzero(seq.past_ids, as_tuple=True)
        ranks = target_ranks(user @ table.T, column[target_ids.view(-1)], rows, column[seq.past_ids[rows, cols]])
        metrics.update(ranks, torch.full((len(ranks),), window.weight))
    return metrics.compute()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True, help="checkout holding the generative_recommenders package")
    p.add_argument("--module", choices=sorted(GIN), required=True)
    p.add_argument("--config", default=str(ROOT / "configs/ml100k_hstu.yaml"), help="our config: data and split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--item-lr", type=float, default=0.0,
                   help="> 0: row-wise Adagrad at this lr for the item table (ours: 0.05), a control run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not (args.reference / "generative_recommenders").is_dir():
        raise SystemExit(f"--reference {args.reference}: no generative_recommenders/ package in it")
    sys.path.insert(0, str(args.reference))
    import fbgemm_gpu  # noqa: F401  registers torch.ops.fbgemm.*, which the reference calls

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_retrieval_config(args.config, [f"data.seed={args.seed}"])
    seqs = read_sequences(Path(cfg.data.path), cfg.data.items_column, cfg.data.time_column, cfg.item.num_embeddings)
    corpus = seqs.corpus()
    readers = {s: SplitReader(seqs, s, cfg, BATCH, 0, 1, shuffle=(s == "train")) for s in ("train", "valid", "test")}
    model, loss_fn, sampler, opts = build(args.module, cfg.item.num_embeddings - 1, corpus, args.item_lr)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"ref-{args.module.lower()}" + (f"-item-adagrad{args.item_lr:g}" if args.item_lr > 0 else "")
    (args.out / "config.json").write_text(json.dumps({
        "kind": "reference", "model": {"name": name}, "data": {"path": str(Path(cfg.data.path)), "batch_size": BATCH},
        "train": {"seed": args.seed, "epochs": args.epochs, "patience": args.patience},
        "eval": {"early_stop_metric": "ndcg@10", "ks": cfg.eval.ks}, "gin": GIN[args.module],
        "item_optimizer": f"rowwise_adagrad lr {args.item_lr:g}" if args.item_lr > 0 else "adamw (as train.py)"},
        indent=1))
    history = (args.out / "metrics_history.jsonl").open("w")
    best, bad = None, 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, loss_fn, sampler, opts, readers["train"], epoch - 1)
        row = {"epoch": epoch, "loss": loss, **{s: evaluate(model, readers[s], corpus, cfg.eval.ks)
                                                 for s in ("valid", "test")}}
        history.write(json.dumps(row) + "\n")
        history.flush()
        print(f"epoch {epoch} loss {loss:.4f} valid ndcg@10 {row['valid']['ndcg@10']:.4f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        if best is None or row["valid"]["ndcg@10"] > best["valid"]["ndcg@10"]:
            best, bad = row, 0
        else:
            bad += 1
        if 0 < args.patience <= bad:
            break
    (args.out / "best.json").write_text(json.dumps({"epoch": best["epoch"], "early_stop_metric": "ndcg@10"}))
    (args.out / "metrics.json").write_text(json.dumps({"valid": best["valid"], "test": best["test"]}, indent=1))
    print(json.dumps({"best_epoch": best["epoch"], "test": best["test"]}))


if __name__ == "__main__":
    main()
