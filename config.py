"""Every flag of train.py: ``TrainConfig`` (one field per flag, ``--num-experts`` for ``num_experts``), what each
does (``HELP``, shown by ``--help`` in groups), each flag's own range (``CHECKS``) and, in ``validate``, the
rules on how train.py's flags combine (the adapters' own shape rules are ``LoRAMoEConfig``'s; what a run dir
allows is run_dir.py's). A bad value or a combination that would do nothing stops here with one line, before
anything is loaded. Settings a user of the recipe does not set are constants where they are used.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

import cli
from lora_moe import ROUTERS, TARGETS, LoRAMoEConfig, check_targets
from model import Qwen3Config

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_DATA = os.path.join(HERE, "samples", "med_sample.jsonl")
DEBIAS = 0.125  # --cl-debias's default tau+ (docs/results.md: it fits better)


@dataclass
class TrainConfig(LoRAMoEConfig):
    """The adapter fields (num_experts, rank, alpha, top_k, dropout, targets, router) and their defaults come from
    ``LoRAMoEConfig``; the rest are the run's."""
    model: str | None = None
    grad_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False
    lambda_bal: float = 0.01
    lambda_z: float = 0.0
    lambda_cl: float = 1.0
    temperature: float = 0.2
    cl_debias: float | None = None  # None: DEBIAS with the contrastive term on, else 0 (resolved in __post_init__)
    queue: int = 0
    data: str = BUNDLED_DATA
    max_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-3
    warmup: int = 10
    seed: int = 0
    out: str = "runs/sparsedoctor"
    save_every: int = 50
    keep: int = 2
    resume: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.cl_debias is None:  # why not a fixed default: with the term off, tau+ would be a setting doing nothing
            self.cl_debias = DEBIAS if self.uses_contrastive else 0.0
        validate(self)

    def loss_weights(self) -> dict:
        """The weight of each routing term as trained: all 0 for plain LoRA (E = 1: no router to train)."""
        routed = self.num_experts > 1
        return {"balance": self.lambda_bal * routed, "z": self.lambda_z * routed,
                "contrastive": self.lambda_cl * routed}

    @property
    def uses_contrastive(self) -> bool:
        return self.loss_weights()["contrastive"] > 0


HELP = {  # group -> {field: what it does and what it goes with}; --help prints these, with default and range
    "data and model": {
        "data": "training jsonl: messages, prompt/response, instruction/input/output, ShareGPT conversations "
                "or a HuatuoGPT data list per line; a malformed line stops the run, naming file:line",
        "max_len": "tokens per example; longer ones are truncated (examples with no answer token left dropped)",
        "model": "Hugging Face Qwen3 checkpoint dir (config.json, *.safetensors, tokenizer.json); "
                 "none: the tiny random demo model. The frozen base is bfloat16 on CUDA, float32 on CPU",
    },
    "adapters": {
        "num_experts": "LoRA experts per adapted projection (E); 1 = plain LoRA: no router, routing terms off",
        "rank": "rank r of each expert",
        "alpha": "the adapters' output is scaled by alpha / rank",
        "top_k": "experts each token is routed to (<= --num-experts); = E is dense routing",
        "dropout": "dropout on the adapters' input",
        "targets": "comma-separated projections to adapt, of " + ",".join(TARGETS),
        "router": "what a router reads: context (x_t and the mean of the projection's inputs over the sequence "
                  "so far; docs/design.md) or token (x_t alone, the paper's token routing)",
    },
    "losses (one weight per term; 0 = off)": {
        "lambda_bal": "weight of the load-balancing term E sum_e f_e P_e",
        "lambda_z": "weight of the router z-loss mean(logsumexp(logits)^2)",
        "lambda_cl": "weight of the expert contrastive term (routed vs fused views, InfoNCE)",
        "temperature": "InfoNCE temperature tau (0.2: experts specialize more than at 0.07; docs/results.md)",
        "cl_debias": "debiased InfoNCE (Chuang et al. 2020): tau+, the expected share of negatives of the anchor's "
                     "own kind, taken out of the negatives' sum (1/8 fits better; docs/results.md); 0 = plain InfoNCE",
        "queue": "the expert memory queue: K past sequences' fused views per adapted projection as more "
                 "negatives; 0 = off (off by default: docs/results.md, the queue)",
    },
    "optimisation": {
        "batch_size": "sequences per micro-batch per process; the contrastive term contrasts each with the others",
        "grad_accum": "micro-batches per optimizer step (the step's batch: batch-size x grad-accum x processes)",
        "steps": "optimizer steps in all (on resume: the total, not the steps still to run)",
        "lr": "peak learning rate of AdamW (~2e-4 on a real Qwen3; 1e-3 suits the tiny demo)",
        "warmup": "linear warmup steps, then cosine down to 0.1 x --lr at --steps",
        "seed": "seed of the adapters' init, the batch order, dropout and token sampling",
    },
    "memory and speed": {
        "grad_checkpointing": "recompute each decoder block in backward: less memory, ~30%% more compute",
        "compile": "torch.compile each decoder block (adapters included); the first steps compile (minutes)",
        "fsdp": "under torchrun: shard the base with FSDP2 instead of replicating it (DDP)",
    },
    "run directory": {
        "out": "run dir: config.json, metrics.jsonl, ckpt-NNNNNN/, latest (one run per dir)",
        "save_every": "steps between checkpoints (the last step is always saved)",
        "keep": "checkpoints kept (older ones pruned)",
        "resume": "continue exactly from a run dir's newest valid checkpoint, or a checkpoint dir; a new dir "
                  "starts fresh",
        "overwrite": "start over in an --out that holds an earlier run (removes only what train.py wrote)",
    },
}
INF = float("inf")
CHECKS = {  # each numeric flag's parser, which states its valid range
    "num_experts": cli.at_least(1), "rank": cli.at_least(1), "top_k": cli.at_least(1),
    "alpha": cli.in_range(0, INF, lo_open=True), "dropout": cli.in_range(0, 1, hi_open=True),
    "max_len": cli.at_least(2), "batch_size": cli.at_least(1), "grad_accum": cli.at_least(1),
    "steps": cli.at_least(1), "lr": cli.in_range(0, INF, lo_open=True), "warmup": cli.at_least(0),
    "seed": cli.at_least(0), "lambda_bal": cli.at_least(0, float), "lambda_z": cli.at_least(0, float),
    "lambda_cl": cli.at_least(0, float), "temperature": cli.in_range(0, INF, lo_open=True),
    "cl_debias": cli.in_range(0, 1, hi_open=True), "queue": cli.at_least(0),
    "save_every": cli.at_least(1), "keep": cli.at_least(1)}
# the adapters' and the queue's shapes a checkpoint was trained with: a resume must use the same ones
# (run_dir.plan_resume also refuses a resume that turns the contrastive term on or off)
FIXED_ON_RESUME = ("num_experts", "rank", "alpha", "top_k", "targets", "router", "queue")


def validate(cfg: TrainConfig):
    """The rules on how train.py's flags combine (each flag's own range is its parser's, in CHECKS): a
    combination that would do nothing, or something other than it says, is refused with one line."""
    contrastive = cfg.uses_contrastive
    if cfg.queue and not contrastive:
        raise ValueError("--queue holds negatives of the contrastive term, which is off (--lambda-cl 0 or "
                         "--num-experts 1)")
    if contrastive and cfg.batch_size < 2 and not cfg.queue:
        raise ValueError("the contrastive term contrasts the sequences of one micro-batch: --batch-size 1 leaves "
                         "no negatives (fit --batch-size 2, better 4, with --grad-checkpointing or a shorter "
                         "--max-len; --queue K runs, but at one sequence per device its routers did not "
                         "specialize: docs/results.md; or --lambda-cl 0)")
    if cfg.cl_debias > 0 and not contrastive:
        raise ValueError("--cl-debias corrects the contrastive term's InfoNCE, which is off (--lambda-cl 0 or "
                         "--num-experts 1)")
    if cfg.cl_debias > 0 and cfg.temperature < 0.02:  # why: debiased_nce takes exp of scores up to 1/tau
        raise ValueError(f"--cl-debias {cfg.cl_debias} needs --temperature >= 0.02 (got {cfg.temperature}: exp(1/tau) "
                         "overflows); give --cl-debias 0 for plain InfoNCE")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards over processes: run under torchrun with --nproc_per_node >= 2")


def parse_targets(s: str) -> tuple:
    try:
        return check_targets(t.strip() for t in s.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_flag(group, f):
    """One field as a flag: its help sentence, default and valid range."""
    text, flag = HELP_OF[f.name], "--" + f.name.replace("_", "-")
    if f.type == "bool":
        group.add_argument(flag, action="store_true", dest=f.name, help=text)
    elif f.name == "cl_debias":  # why None: the default depends on whether the term is on (TrainConfig resolves it)
        group.add_argument(flag, type=CHECKS[f.name], default=None, help=f"{text} (default: {DEBIAS} with the "
                           f"contrastive term on, else 0; {CHECKS[f.name].valid})")
    elif f.name == "data":  # why not the default's path: --help must not print this machine's directories
        group.add_argument(flag, default=f.default, help=f"{text} (default: the bundled samples/med_sample.jsonl)")
    elif f.name == "router":  # why None: the default depends on --num-experts (LoRAMoEConfig resolves it)
        group.add_argument(flag, choices=ROUTERS, default=None, help=f"{text} (default: context; token with "
                                                                     "--num-experts 1, which has no router)")
    elif f.name == "queue":
        group.add_argument(flag, type=CHECKS[f.name], default=f.default, metavar="K",
                           help=f"{text} (default: {f.default})")
    elif f.name == "targets":
        group.add_argument(flag, type=parse_targets, default=TARGETS, help=f"{text} (default: all)")
    elif f.default is None:
        group.add_argument(flag, default=None, dest=f.name, help=text)
    else:
        typ = CHECKS.get(f.name, str)
        valid = f"; {typ.valid}" if hasattr(typ, "valid") else ""
        group.add_argument(flag, type=typ, default=f.default, dest=f.name,
                           help=f"{text} (default: {f.default}{valid})")


HELP_OF = {name: text for group in HELP.values() for name, text in group.items()}


def parse_args(argv=None, description: str = "") -> TrainConfig:
    """Flags -> TrainConfig; every value checked here, before anything is loaded."""
    ap = cli.Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    by_name = {f.name: f for f in fields(TrainConfig)}
    for title, names in HELP.items():
        group = ap.add_argument_group(title)
        for name in names:
            add_flag(group, by_name[name])
    ns = ap.parse_args(argv)
    try:
        cfg = TrainConfig(**vars(ns))
    except ValueError as e:
        ap.error(str(e))
    if not os.path.isfile(cfg.data):
        kind = "a directory" if os.path.isdir(cfg.data) else "not a regular file" if os.path.exists(cfg.data) \
            else "not found"
        ap.error(f"argument --data: {cfg.data} is {kind}, expected a jsonl file")
    if cfg.model is not None:
        for name in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(cfg.model, name)):
                ap.error(f"argument --model: {cfg.model} has no {name}: expected a Hugging Face Qwen3 checkpoint")
        try:
            Qwen3Config.from_json(os.path.join(cfg.model, "config.json"))
        except (ValueError, KeyError, TypeError, UnicodeError) as e:
            ap.error(f"argument --model: {cfg.model}/config.json: {cli.message(e)}")
    return cfg
