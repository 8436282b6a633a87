"""Shared by the per-model sharding-strategy tests (test_captioner.py, test_t2i.py): the three
strategies on 8 virtual devices, and the compiled step's memory line the loop logs at start."""

import logging
import re

# mesh.strategy presets as each model's tests run them; fsdp_tp with data=2 uses all three axes.
STRATEGY_MESHES = {
    "dp": dict(strategy="dp", num_devices=0),  # data=8
    "fsdp": dict(strategy="fsdp", num_devices=0),  # fsdp=8
    "fsdp_tp": dict(strategy="fsdp_tp", data=2, tensor=2, num_devices=0),  # data=2 x fsdp=2 x tensor=2
}
SINGLE_DEVICE = dict(strategy="", data=1, fsdp=1, tensor=1, num_devices=1)


class LogLines(logging.Handler):
    """Collects the messages of one logger (whatever its propagation) inside a `with` block."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.logger = logging.getLogger(name)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self._level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self.lines

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


def argument_mib(memory_lines: list[str]) -> float:
    """Per-device argument MiB from the loop's "train step compiled ...; per device: ..." line."""
    assert len(memory_lines) == 1, memory_lines
    match = re.search(r"per device: arguments ([0-9.]+) MiB, outputs [0-9.]+ MiB, temporaries [0-9.]+ MiB",
                      memory_lines[0])
    assert match, memory_lines[0]
    return float(match.group(1))


def check_memory(strategy: str, memory_lines: list[str], single_device_lines: list[str]) -> None:
    """The logged memory analysis reflects the strategy: parameters and optimizer state (most of
    a tiny model's step arguments) are replicated under dp and split under fsdp / fsdp_tp."""
    single, sharded = argument_mib(single_device_lines), argument_mib(memory_lines)
    if strategy == "dp":
        assert sharded > 0.5 * single, (sharded, single)
    else:
        assert sharded < 0.5 * single, (sharded, single)
