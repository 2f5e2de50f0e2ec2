import pytest
import torch

from slit_lightning.training import precision
from slit_lightning.training.precision import cpu_autocast, has_bf16_flags, native_bf16

X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4800\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\n"


@pytest.mark.parametrize(
    ("text", "machine", "expected"),
    [
        (X86.format(extra="avx512_bf16"), "x86_64", True),
        (X86.format(extra="amx_bf16 amx_tile"), "x86_64", True),
        (X86.format(extra="avx512_vnni"), "x86_64", False),
        (ARM.format(extra="bf16 i8mm"), "aarch64", True),
        (ARM.format(extra="sve"), "aarch64", False),
        ("", "x86_64", False),
    ],
)
def test_bf16_is_native_only_with_the_matrix_instructions(text, machine, expected):
    assert has_bf16_flags(text, machine) is expected


def test_cpu_autocast_multiplies_in_bf16_only_when_asked():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with cpu_autocast(True):
        assert (a @ b).dtype == torch.bfloat16
    with cpu_autocast(False):
        assert (a @ b).dtype == torch.float32
    with cpu_autocast():
        assert (a @ b).dtype == (torch.bfloat16 if native_bf16() else torch.float32)


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_configs_ask_for_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    """``${cpu_precision:}`` in a stage config resolves to what this CPU runs fast."""
    from omegaconf import OmegaConf

    from slit_lightning.cli.train import register_resolvers

    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    register_resolvers()
    config = OmegaConf.create({"trainer": {"precision": "${cpu_precision:}"}})
    assert config.trainer.precision == expected == precision.cpu_precision()
