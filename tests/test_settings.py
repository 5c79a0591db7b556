"""Settings: flags and TAPSERVE_* twins from one model; thread defaults from the CPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import settings as settings_module
from service.cli import _parser
from service.settings import Settings, available_cpus, inter_op_threads, intra_op_threads


def test_env_twins_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPSERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("TAPSERVE_MODEL_REPOSITORY", "/srv/models")
    s = Settings()
    assert (s.grpc_port, s.model_repository, s.metrics_port) == (9001, Path("/srv/models"), 8002)
    assert Settings(grpc_port=7000).grpc_port == 7000  # a flag beats its env twin


def test_every_setting_is_a_serve_flag() -> None:
    args = _parser().parse_args(["serve", "--grpc-port", "1", "--drain-grace-seconds", "3"])
    assert (args.grpc_port, args.drain_grace_seconds) == ("1", "3")
    for name in Settings.model_fields:
        assert hasattr(args, name), name


def test_intra_op_threads_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 16)
    assert intra_op_threads(Settings()) == 8  # two batches in flight share 16 CPUs
    assert intra_op_threads(Settings(cpu_batches_in_flight=4)) == 4
    assert intra_op_threads(Settings(intra_op_threads=3)) == 3
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 1)
    assert intra_op_threads(Settings()) == 1


def test_inter_op_threads_leave_one_cpu_to_the_front_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 16)
    assert inter_op_threads(Settings()) == 15
    assert inter_op_threads(Settings(inter_op_threads=4)) == 4
    assert inter_op_threads(Settings(inter_op_threads=0)) == 0  # TensorFlow's own default
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 2)
    assert inter_op_threads(Settings()) == 1
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 1)
    assert inter_op_threads(Settings()) == 1


def test_a_container_quota_caps_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(64)))
    real = Path.read_text
    quota = {"value": "250000 100000\n"}  # a Kubernetes limit of 2.5 CPUs

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        return quota["value"] if str(self) == "/sys/fs/cgroup/cpu.max" else real(self)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert available_cpus() == 2
    quota["value"] = "max 100000\n"
    assert available_cpus() == 64


def test_the_event_loop_is_uvloop_s_where_installed_else_asyncio_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    import uvloop

    from service.cli import loop_factory
    from service.errors import ConfigError

    assert loop_factory("asyncio") is None  # asyncio.Runner's default loop
    for choice in ("auto", "uvloop"):
        factory = loop_factory(choice)
        assert factory is not None
        with asyncio.Runner(loop_factory=factory) as runner:
            assert isinstance(runner.get_loop(), uvloop.Loop)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")
