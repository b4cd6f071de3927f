"""``run.threads = "auto"`` (the default): the rule in ``secfed.models.auto_threads`` and its plumbing."""

from __future__ import annotations

import pytest
import torch

from secfed.config import parse_config
from secfed.errors import ConfigError
from secfed.models import auto_threads, torch_threads, usable_cpus


@pytest.mark.parametrize("usable,load,total,expected", [
    (2, 0.0, 2, 2),     # idle 2-core machine: both cores
    (2, 0.4, 2, 2),     # 80% idle -> 1.6 -> 2
    (2, 1.0, 2, 1),     # one busy process: one core left
    (2, 10.0, 2, 1),    # overloaded: never below 1
    (16, 4.0, 16, 12),  # a quarter busy
    (4, 0.0, 64, 4),    # affinity / quota caps an idle 64-core host at the 4 CPUs we may use
    (4, 48.0, 64, 1),   # the host's busy fraction (75%) holds on our CPUs too
])
def test_auto_threads_rule(usable, load, total, expected):
    assert auto_threads(usable=usable, load=load, total=total) == expected


def test_auto_threads_never_exceeds_what_the_process_may_use():
    n = auto_threads()
    assert 1 <= n <= usable_cpus()


def test_torch_threads_sets_and_reports_the_count():
    before = torch.get_num_threads()
    try:
        assert torch_threads(1) == 1 == torch.get_num_threads()
        assert torch_threads(0) == 1  # 0 leaves torch's setting alone
        n = torch_threads("auto")
        assert n == torch.get_num_threads() and 1 <= n <= usable_cpus()
    finally:
        torch.set_num_threads(before)


def test_config_threads_default_is_auto_and_values_are_checked():
    base = {"run": {"name": "t"}, "model": {"name": "tiny-bert"}, "data": {"source": "synthetic-text"}}
    assert parse_config(base).run.threads == "auto"
    for ok in (0, 1, 8, "auto"):
        assert parse_config({**base, "run": {"threads": ok}}).run.threads == ok
    for bad in (-1, "fast"):
        with pytest.raises(ConfigError, match="threads"):
            parse_config({**base, "run": {"threads": bad}})


def test_secfed_threads_env_pins_auto(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SECFED_THREADS", "1")
        assert torch_threads("auto") == 1
        monkeypatch.setenv("SECFED_THREADS", "not-a-number")  # ignored: the load rule decides
        assert 1 <= torch_threads("auto") <= usable_cpus()
    finally:
        torch.set_num_threads(before)
