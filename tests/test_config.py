"""The config tree composes, validates against the schema, and documents every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from saber.config import ConfigError, SaberConfig, register_configs, validate

CONF = Path(__file__).resolve().parent.parent / "conf"
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_validates() -> None:
    cfg = validate(_compose())
    assert cfg.model.name == "organism"
    assert cfg.extract.method == "svd" and cfg.extract.k == 4


def test_typo_fails_with_key_name() -> None:
    with pytest.raises(ConfigCompositionException, match=re.escape("extract.kk")):
        _compose("extract.kk=3")


def test_added_unknown_key_fails_at_validation() -> None:
    with pytest.raises(Exception, match="topk"):
        validate(_compose("+rank.topk=3"))


@pytest.mark.parametrize("override, key", [
    ("entangle.tau=1.5", "entangle.tau"),
    ("extract.method=pca", "extract.method"),
    ("rank.depth_min=1.0", "rank.depth_min"),
    ("iterate.max_iterations=0", "iterate.max_iterations"),
    ("evaluate.kl_tokens=0", "evaluate.kl_tokens"),
    ("edit.dtype_compute=float16", "edit.dtype_compute"),
])
def test_out_of_range_fails_with_key_name(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(_compose(override))


def test_edit_settings_reach_the_library_unchanged() -> None:
    """One EditConfig: what the config group validates is what the edit functions receive."""
    from saber.edit import EditConfig
    from saber.edit.config import as_edit_config

    cfg = validate(_compose("edit.dtype_compute=float64", "edit.scope=same"))
    assert type(cfg.edit) is EditConfig
    edit = as_edit_config(_compose("edit.dtype_compute=float64", "edit.scope=same").edit)
    assert (edit.dtype_compute, edit.scope) == ("float64", "same")


def test_wrong_type_fails() -> None:
    with pytest.raises(ConfigCompositionException, match="extract.k"):
        _compose("extract.k=four")


@pytest.mark.parametrize("method, extract, strategy", [
    ("arditi", "mean_diff", "global_topk"), ("kernel", "mean_diff", "all"), ("saber", "svd", "global_topk")])
def test_method_presets(method: str, extract: str, strategy: str) -> None:
    cfg = validate(_compose(f"method={method}"))
    assert cfg.method == method and cfg.extract.method == extract and cfg.rank.strategy == strategy


def test_real_model_presets_select_bundled_data() -> None:
    for preset in ("gemma4_e4b", "llama3_8b", "qwen3_8b"):
        cfg = validate(_compose(f"model={preset}"))
        assert cfg.model.path and cfg.data.harmful.path == "bundled://harmful"


def test_gemma4_sweep_preset() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=gemma4"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert set(params) == {"entangle.alpha_base", "rank.top_k", "entangle.tau", "entangle.alpha_entangled", "extract.k"}
    c = validate(cfg)
    assert (c.model.path, c.extract.k, c.rank.top_k, c.entangle.alpha_base, c.entangle.alpha_entangled,
            c.entangle.tau, c.iterate.max_iterations) == ("google/gemma-4-E4B-it", 4, 14, 0.825, 0.03, 0.55, 4)


def _undocumented(path: Path) -> list[str]:
    bad = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or stripped == "defaults:":
            continue
        if stripped.endswith(":"):
            continue  # a parent key: its children carry the comments
        if "#" not in line:
            bad.append(f"{path.relative_to(CONF)}:{number}: {stripped}")
    return bad


def test_every_config_key_is_documented() -> None:
    bad = [entry for path in sorted(CONF.rglob("*.yaml")) for entry in _undocumented(path)]
    assert not bad, "config keys without a one-line comment:\n" + "\n".join(bad)


def test_stage_list_has_one_source() -> None:
    """The schema default, the Makefile's stage targets and the shells' registry all follow
    saber.stage_names."""
    from saber.config import SaberConfig
    from saber.stage_names import AUXILIARY, STAGE_ORDER
    from stages import STAGES

    from importlib.metadata import entry_points

    assert SaberConfig().stages == list(STAGE_ORDER)
    assert list(STAGES) == list(STAGE_ORDER) and all(name in STAGES for name in AUXILIARY)
    # every stage's spec is named in the package's entry points, and loads under its own name
    declared = {ep.name for ep in entry_points(group="saber.stages")}
    assert declared == set(STAGE_ORDER) | set(AUXILIARY)
    assert all(STAGES[name].name == name for name in declared)
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text().splitlines()
    (targets,) = [line.split(":")[0].split() for line in makefile if line.startswith("collect ")]
    assert set(targets) == set(STAGE_ORDER) | set(AUXILIARY)
    assert "stages:" not in (Path(__file__).resolve().parents[1] / "conf" / "config.yaml").read_text().replace(
        "# stages:", "")


def test_library_never_imports_the_stage_shells() -> None:
    """saber/ finds the stage specs through entry points; no module of it imports `stages`."""
    import ast

    root = Path(__file__).resolve().parents[1] / "saber"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root.parent)}: {n}" for n in names if n.split(".")[0] == "stages"]
    assert not offenders, offenders


def _searching(space: dict[str, str] | None, *overrides: str) -> SaberConfig:
    cfg = validate(_compose(*overrides))
    if space is not None:
        cfg.search.space = space
    return cfg


@pytest.mark.parametrize("space, overrides, bad", [
    (None, ["search=kernel"], "entangle.kernel.peak_position"),   # the kernel knobs without the kernel mode
    ({"entangle.alpha_base": "float:0.5:1.0"}, [], "entangle.alpha_base"),   # a common factor the calibration cancels
    ({"rank.top_k": "int:2:8", "entangle.tau": "float:0.3:0.8"}, [], "entangle.tau"),   # measured mode only labels with it
])
def test_a_search_over_a_knob_the_run_never_reads_is_refused(space: dict[str, str] | None, overrides: list[str], bad: str) -> None:
    from saber.search import check_space_acts

    with pytest.raises(ValueError, match=f"search.space.{bad}' cannot change the edit"):
        check_space_acts(_searching(space, *overrides))


@pytest.mark.parametrize("space, overrides", [
    (None, []), (None, ["method=kernel", "search=kernel"]),
    ({"entangle.tau": "float:0.3:0.8", "entangle.alpha_base": "float:0.5:1.0"}, ["method=saber_published"])])
def test_the_shipped_search_spaces_act_on_their_runs(space: dict[str, str] | None, overrides: list[str]) -> None:
    from saber.search import check_space_acts

    check_space_acts(_searching(space, *overrides))
