"""Fixtures the stage tests share."""

import pytest
import torch

from slit_lightning.stages import Stage1

QFORMER = {"num_queries": 4, "cross_attention_freq": 2}


@pytest.fixture(scope="module")
def stage1_ckpt(tiny_encoder, tiny_bert, tmp_path_factory):
    """A stage-1 checkpoint as Lightning writes it (encoder by reference)."""
    torch.manual_seed(1)
    stage1 = Stage1(str(tiny_encoder), str(tiny_bert), embed_dim=16, **QFORMER)
    checkpoint = {"state_dict": stage1.state_dict()}
    stage1.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("stage1") / "last.ckpt"
    torch.save(checkpoint, path)
    return path, stage1.qformer.state_dict()
