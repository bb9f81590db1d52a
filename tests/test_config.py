"""Every config field is checked when the config is made (Python, YAML or CLI), with an error
naming the field, the value and what is allowed, before any model or image is loaded."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

import gig.pipeline
from gig.cli import app
from gig.config import _RULES, Config, ConfigError, stage_hash

#: The bad settings a new user tried (issue 10): each was accepted, or failed hours later.
BAD = [
    ("n_steps", -4),
    ("n_steps", "sixteen"),
    ("top_k", 0),
    ("target_rel_error", -0.5),
    ("target_rel_error", 5),
    ("quadrature", "simpson"),
    ("layers", "_blocks.8"),
    ("layers", []),
    ("layers", ["_blocks.4", "_blocks.4"]),
    ("max_images", -5),
    ("max_images", 0),
    ("batch_size", 0),
    ("gig_tol", 0),
    ("gig_tol", True),
    ("device", "gpu"),
    ("target", "labels"),
    ("seed", -1),
    ("samples_per_image", 0),
    ("min_cluster", 0),
    ("max_concepts", 1),
    ("lasso_max_iter", 0),
    ("nonnegative", "yes"),
    ("graph_classes", [-1]),
    ("graph_classes", 3),
    ("edges_per_node", 0),
    ("internal_batch_size", 0),
    ("gig_max_steps", 8),
    ("calibration_size", 5),
    ("model", ""),
    ("dictionaries", ["channels"]),
    ("concepts_per_channel", 2.5),
    # issue 25: accepted, then refused by scikit-learn after collect, or no progress for days
    ("seed", 2**32),
    ("n_steps", 10**7),
    ("gig_max_steps", 10**7),
    ("max_kl", 0),
    ("max_kl", -0.1),
    ("max_kl", "small"),
]


def test_every_field_has_a_rule():
    assert set(_RULES) == {f.name for f in dataclasses.fields(Config)}
    Config()  # the defaults pass their own rules


@pytest.mark.parametrize("name,value", BAD)
def test_bad_value_is_refused_naming_field_and_value(name, value):
    with pytest.raises(ConfigError) as info:
        Config(**{name: value})
    message = str(info.value)
    assert f"{name}={value!r}" in message and "\n" not in message


def test_all_bad_fields_reported_at_once():
    with pytest.raises(ConfigError) as info:
        Config(n_steps=-3, top_k=0, max_images=-5)
    assert all(f in str(info.value) for f in ("n_steps=-3", "top_k=0", "max_images=-5"))


def test_dictionary_for_a_layer_not_analysed():
    with pytest.raises(ConfigError, match="_blocks.9 not in layers"):
        Config(layers=["_blocks.8"], dictionaries={"_blocks.9": "channels"})


def test_yaml_value_of_wrong_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('n_steps: "sixteen"\n')
    with pytest.raises(ConfigError, match="n_steps='sixteen'"):
        Config.load(path)


@pytest.mark.parametrize(
    "args,field",
    [
        (["--max-images", "-5"], "max_images"),
        (["--max-images", "0"], "max_images"),
        (["--gig-tol", "2"], "gig_tol"),
        (["--device", "gpu"], "device"),
    ],
)
def test_cli_exits_2_before_the_model_loads(tmp_path, monkeypatch, args, field):
    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gig.pipeline, "load_run_model", no_model)
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and f"config option {field}=" in result.output
    assert not (tmp_path / "r").exists()


def test_cli_yaml_error_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("top_k: 0\n")
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "--config", str(path)])
    assert result.exit_code == 2 and "top_k=0" in result.output


def test_version():
    from gig import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"gig {__version__}"


def test_python_dash_m_gig():
    import subprocess
    import sys

    from gig import __version__

    done = subprocess.run([sys.executable, "-m", "gig", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"gig {__version__}"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """The CLI catches GigError (exit 2, one line) and nothing else: a bug's own ValueError
    propagates with its traceback instead of turning into a user-facing one-liner."""
    from gig.errors import ConfigError, GigError, InputError, LayerNotFoundError, RunMismatchError

    assert all(issubclass(kind, GigError) for kind in (ConfigError, InputError, LayerNotFoundError, RunMismatchError))
    assert issubclass(ConfigError, ValueError) and issubclass(LayerNotFoundError, KeyError)

    def bug(*_a, **_k):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(gig.pipeline, "collect", bug)
    result = CliRunner().invoke(app, ["collect", str(tmp_path / "r"), "--max-images", "1", "--layer", "_blocks.15"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a gig run directory" in result.output


def test_coder_field_keeps_the_hashes_of_runs_made_before_it(monkeypatch):
    """``coder`` joined the decompose fields later: at the value runs had before it (lasso) the
    stage hash is the one the field list without it gives (earlier runs stay valid); ``omp``
    (today's default) changes it."""
    import gig.config as config_module

    before = stage_hash(Config(coder="lasso"), "decompose", "up")
    omp = stage_hash(Config(coder="omp"), "decompose", "up")
    fields = dict(config_module.STAGE_FIELDS)
    fields["decompose"] = [f for f in fields["decompose"] if f != "coder"]
    monkeypatch.setattr(config_module, "STAGE_FIELDS", fields)
    assert stage_hash(Config(coder="lasso"), "decompose", "up") == before
    assert omp != before


def test_a_run_saved_before_max_kl_reads_and_resumes_as_made(tmp_path):
    """A 0.3 run's config.yaml has no ``max_kl``: read as the run's own config it keeps the earlier
    agreement rule (``max_kl`` None) and every stage hash 0.3 wrote for the default config (the
    values below, computed by gig 0.3.0); a new config takes the KL rule and the OMP coder, and a
    new hash."""
    import yaml

    old_hashes = {
        "collect": "85e0bac00f58b461",
        "concepts": "5b94005bae625611",
        "decompose": "f79bee8707e54d29",
        "attribute": "b0c0b0e0316f0365",
        "graph": "a7fac512e780adaa",
    }
    data = Config(coder="lasso").to_dict()  # 0.3's default coder, saved by 0.3 in every run
    del data["max_kl"], data["null_directions"]  # fields that 0.3 did not have
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    saved = Config.load_saved(tmp_path / "config.yaml")
    assert saved.max_kl is None and saved.coder == "lasso" and saved.null_directions == 0
    del data["coder"]  # a run made before the coder could be chosen was coded by Lasso
    (tmp_path / "older.yaml").write_text(yaml.safe_dump(data))
    assert Config.load_saved(tmp_path / "older.yaml").coder == "lasso"
    upstream = ""
    for stage, want in old_hashes.items():
        upstream = stage_hash(saved, stage, upstream)
        assert upstream == want, stage
    assert Config.load(tmp_path / "older.yaml").max_kl == Config().max_kl is not None
    assert Config.load(tmp_path / "older.yaml").coder == Config().coder == "omp"
    assert stage_hash(Config(), "decompose", "x") != stage_hash(saved, "decompose", "x")


def test_every_command_answers_a_full_disk_in_one_line(tmp_path, monkeypatch):
    """One decorator guards every command: each registered callback is wrapped by it, and a full
    disk where no command caught one before (the report's writes) ends in one line, exit 2."""
    import errno

    import gig.report
    from gig.cli import one_line_errors

    guard = one_line_errors(lambda: None).__code__  # every guarded command runs this code
    for command in app.registered_commands:
        assert command.callback.__code__ is guard, command.name

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report" / "index.html"))

    monkeypatch.setattr(gig.report, "build_report", full)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "disk full while writing" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
