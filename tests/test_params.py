"""The parameter table (mhpc/params.py) is the one declaration: the constructor, the CLI's model flags, the
stored JSON form and the README's defaults all agree with it."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mhpc import params
from mhpc.core.mh_patch_core import MHPatchCore
from mhpc.errors import MHPCError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_constructor_signature_is_the_table():
    """The signature repeats the table for IDEs; names, order and defaults must be the table's exactly."""
    signature = [(p.name, p.default) for p in inspect.signature(MHPatchCore.__init__).parameters.values()
                 if p.name != "self"]
    assert signature == [(name, p.default) for name, p in params.PARAMS.items()]
    model = MHPatchCore(seed=7)
    assert {name: getattr(model, name) for name in params.PARAMS} == {**params.defaults(), "seed": 7}
    assert all(name in MHPatchCore.__doc__ for name in params.PARAMS)


def test_cli_model_flags_come_from_the_table():
    from mhpc.cli import _model_config, build_parser

    parser = build_parser()
    args = parser.parse_args(["fit", "--out", "x", "--algorithm", "online", "--feature-reduction", "pca",
                              "--layers", "a", "b", "--coreset-percentage", "0.2", "--seed", "3",
                              "--backbone", "resnet18"])
    cfg = _model_config(args)
    assert cfg["algorithm"] == "ONLINE" and cfg["feature_reduction"] == "PCA" and cfg["seed"] == 3
    assert cfg["embedding_layers"] == ["a", "b"] and cfg["coreset_percentage"] == 0.2 and cfg["backbone"] == "resnet18"
    fit = next(a for a in parser._subparsers._group_actions[0].choices["fit"]._actions if a.dest == "aggregation")
    assert fit.choices == [m.name for m in params.PatchCoreAggregation] and fit.help == params.PARAMS["aggregation"].help
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "--out", "x", "--distance", "cosine"])


def test_json_form_round_trips_and_is_checked_without_a_model():
    config = params.to_json(params.defaults())
    assert params.check_config(config) is config
    assert MHPatchCore(**params.from_json(config)).get_config() == config
    with pytest.raises(MHPCError, match=r"config: invalid distance 'COSINE'"):
        params.check_config({**config, "distance": "COSINE"})
    with pytest.raises(MHPCError, match=r"config: seed must be an integer in \[0, 4294967295\], got -1"):
        params.check_config({**config, "seed": -1})
    with pytest.raises(MHPCError, match=r"unknown key\(s\) \['colour'\]"):
        params.check_config({**config, "colour": 1})
    with pytest.raises(MHPCError, match=r"lacks \['seed'\]"):
        params.check_config({k: v for k, v in config.items() if k != "seed"})


def test_readme_defaults_are_the_table():
    """The README's "Other parameters (defaults)" line lists table defaults, each as the table has it."""
    text = README.read_text()
    line = text[text.index("Other parameters (defaults):"):]
    line = line[: line.index("\n\n")]
    found = dict(re.findall(r"`(\w+)=([^`]+)`", line))
    assert len(found) >= 15
    for name, value in found.items():
        assert name in params.PARAMS, name
        assert ast.literal_eval(value) == params.PARAMS[name].default, name


def test_public_imports_and_no_torch_for_the_package_or_the_table():
    import mhpc
    from mhpc.core.backbones import BackboneName
    from mhpc.core.mh_patch_core import PatchCoreAlgorithm

    assert mhpc.MHPatchCore is MHPatchCore and BackboneName is params.BackboneName
    assert PatchCoreAlgorithm is params.PatchCoreAlgorithm
    code = "import sys, mhpc, mhpc.params, mhpc.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

