"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events and loss.png, and the same
metrics to Weights & Biases when train.wandb_project is set."""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import time
from pathlib import Path

from gpt_jax.config import ConfigError
from gpt_jax.rundir import drop_torn_line, read_jsonl

WANDB_INSTALL = 'pip install -e ".[wandb]"'
WANDB_ID = "wandb_run_id"  # in the run directory: a resumed run continues the same W&B run


class MetricsLog:
    """metrics.jsonl + TensorBoard events in the run directory (process 0 only), and W&B when `config`
    names a project: every number of a record, as `kind/name` at the record's step."""

    def __init__(self, run_dir: Path, enabled: bool, config=None):
        self.enabled, self.wandb = enabled, None
        if enabled:
            drop_torn_line(run_dir / "metrics.jsonl")  # a writer that died mid-line
            self.file = open(run_dir / "metrics.jsonl", "a")
            self.tb = EventWriter(run_dir / "tensorboard")
            if config is not None and config.train.wandb_project is not None:
                self.wandb = start_wandb(run_dir, config)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("step", "kind") and isinstance(v, (int, float))}
        for tag, v in scalars.items():
            self.tb.scalar(tag, v, record["step"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self, failed: bool = False):
        if self.enabled:
            self.file.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else 0)


def require_wandb(train) -> None:
    """train.wandb_project needs the wandb package: one line saying how to install it, before any data is
    prepared or anything compiles. Without a project nothing of wandb is imported."""
    if train.wandb_project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.wandb_project={train.wandb_project} logs to Weights & Biases, but the wandb package "
                          f"is not installed: {WANDB_INSTALL} (or pip install wandb), or unset train.wandb_project") from None


def start_wandb(run_dir: Path, config):
    """The run's W&B run, with its resolved config. Its id is kept in the run directory, so a resumed run
    continues it (resume="allow"); a step W&B already has keeps its first values, which a resumed run
    reproduces exactly anyway. WANDB_MODE (offline, disabled) is W&B's own; its files go in the run
    directory unless WANDB_DIR says where."""
    import wandb

    id_file = run_dir / WANDB_ID
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(8) + "\n")  # W&B ids: letters, digits, - and _
    try:
        return wandb.init(project=config.train.wandb_project, name=config.train.wandb_name,
                          id=id_file.read_text().strip(), resume="allow", config=config.to_dict(),
                          dir=None if os.environ.get("WANDB_DIR") else run_dir)
    except wandb.Error as e:  # not logged in, no network: one line, as for any setting that cannot work
        raise ConfigError(f"Weights & Biases did not start the run ({e}); run `wandb login`, set WANDB_MODE=offline "
                          "(then `wandb sync`), or unset train.wandb_project") from None


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            return bytes(out + bytes([byte]))
        out.append(byte | 0x80)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class EventWriter:
    """TensorBoard scalars, written directly: a TFRecord file of `Event` protocol buffers (wall_time = 1,
    step = 2, file_version = 3, summary = 5; Summary.value = 1; Value.tag = 1, simple_value = 2), the
    format TensorBoard reads. No TensorFlow, tensorboardX or protobuf package, so a run does not pay for
    importing torch where it is installed. One file per writer, as TensorBoard expects of a resumed run."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.file = open(folder / name, "ab")
        self._event(0, _field(3, b"brain.Event:2"))

    def _event(self, step: int, payload: bytes) -> None:
        if step < 0:
            raise ValueError(f"step {step} is negative")
        data = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + payload
        header = struct.pack("<Q", len(data))
        self.file.write(header + _masked_crc(header) + data + _masked_crc(data))

    def scalar(self, tag: str, value: float, step: int) -> None:
        value_proto = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
        self._event(step, _field(5, _field(1, value_proto)))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: train and val loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    series = {}
    for r in records:  # later records win: a resumed run rewrites the steps after its checkpoint
        key = "val_loss" if r["kind"] == "eval" else "loss"
        if key in r:
            series.setdefault(r["kind"], {})[r["step"]] = r[key]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in series.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label="val" if kind == "eval" else "train",
                marker="o" if kind == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return run_dir / "loss.png"
