"""The process group's end: destroyed at exit once a method module has run on several processes."""

from __future__ import annotations

import torch.distributed as dist

from kd_lightning.modules import distributed


def test_the_exit_handler_is_registered_once_and_destroys_the_group(tmp_path, monkeypatch):
    registered = []
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    distributed.destroy_process_group_at_exit.cache_clear()
    distributed.destroy_process_group_at_exit()
    distributed.destroy_process_group_at_exit()
    assert registered == [distributed._destroy_process_group]
    distributed.destroy_process_group_at_exit.cache_clear()  # the next caller registers the real handler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    registered[0]()
    assert not dist.is_initialized()
    registered[0]()  # a second call (the group already gone) does nothing
