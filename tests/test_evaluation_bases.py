"""The concept-basis contract, its registry and the evaluation settings: each basis against an
independent answer (a hand computation, the run's coder), save / load round trips, and a user's
basis through ``gig evaluate -m user:PATH``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from gig.config import Config
from gig.errors import ConfigError, InputError
from gig.evaluation import ConceptBasis, EvaluationSettings, basis_class, registered
from gig.evaluation.bases import coder_settings
from gig.evaluation.methods.dictionary import DictionaryLearningBasis
from gig.evaluation.methods.kmeans import KMeansBasis
from gig.evaluation.methods.sae import TopKSAEBasis
from gig.evaluation.methods.user import UserBasis
from gig.evaluation.settings import EvaluationPlan
from gig.models import wrap_module
from gig.pipeline import Pipeline
from gig.store import load_json


def _clustered(n: int = 300, c: int = 8, k: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, c, generator=g) * 3
    return centres[torch.randint(0, k, (n,), generator=g)] + 0.2 * torch.randn(n, c, generator=g)


# ------------------------------------------------------------------------------ registry and settings
def test_registry_lists_the_methods_and_refuses_unknown_names():
    assert {"ours", "dictionary", "sae", "sae-torch", "kmeans", "user"} <= set(registered())
    assert basis_class("kmeans") is KMeansBasis and basis_class("user:x.safetensors") is UserBasis
    with pytest.raises(ConfigError, match="unknown method 'nmff'"):
        basis_class("nmff")
    with pytest.raises(ConfigError, match="unknown method 'user'"):  # the user basis needs its path
        basis_class("user")
    with pytest.raises(ConfigError, match=r"evaluation setting methods=\['ours', 'nmff'\]: unknown method 'nmff'"):
        EvaluationSettings(methods=["ours", "nmff"])
    with pytest.raises(ConfigError, match="no file or folder"):
        EvaluationSettings(methods=["user:/no/such/basis.safetensors"])


def test_settings_are_validated_naming_each_field():
    with pytest.raises(ConfigError) as err:
        EvaluationSettings(n_points=1, extraction_images=-1, orderings=["gig", "best"])
    text = str(err.value)
    assert "n_points=1" in text and "extraction_images=-1" in text and "orderings=['gig', 'best']" in text
    with pytest.raises(ConfigError, match="batch_rows=20: at least 2·n_points = 42"):
        EvaluationSettings(batch_rows=20)
    with pytest.raises(ConfigError, match="sae_k=0"):
        EvaluationSettings(sae_k=0)
    with pytest.raises(ConfigError, match="unknown evaluation setting"):
        EvaluationSettings.from_dict({"n_image": 3})


def test_settings_hash_is_stable_and_reuse_key_ignores_speed_settings():
    a = EvaluationSettings(methods=("ours", "kmeans", "ours"), seed=1)
    b = EvaluationSettings.from_dict(json.loads(json.dumps(a.to_dict())))
    assert a.methods == ["ours", "kmeans"] and a == b and a.hash() == b.hash()
    assert a.hash() != EvaluationSettings(methods=["ours", "kmeans"], seed=2).hash()
    # the hash is a fixed function of the fields (sorted JSON), not of the process
    assert a.hash() == EvaluationSettings(methods=["ours", "kmeans"], seed=1).hash()

    def plan(**kw) -> EvaluationPlan:
        return EvaluationPlan(EvaluationSettings(**kw), "run", ["l1"], None, "riemann-midpoint", 0.01, 512, 64)

    assert plan(batch_rows=200, n_boot=10, plots=False).key() == plan().key()
    assert plan(n_points=11).key() != plan().key() and plan(sae_k=3).key() != plan().key()


# ------------------------------------------------------------------------------ each basis, independently
def test_user_basis_transform_is_the_documented_formula(tmp_path):
    g = torch.Generator().manual_seed(1)
    K, C = 7, 5
    t = {
        "components": torch.randn(K, C, generator=g),
        "W_enc": torch.randn(C, K, generator=g),
        "b_enc": torch.randn(K, generator=g),
        "b_pre": torch.randn(C, generator=g),
        "threshold": torch.full((K,), 0.3),
    }
    path = tmp_path / "mine.safetensors"
    save_file(t, str(path), metadata={"top_k": "2"})
    X = torch.randn(40, C, generator=g)
    basis = UserBasis(str(path)).fit(X)
    # by hand, row by row: ReLU((x − b_pre) W + b), JumpReLU threshold, keep the 2 largest
    want = torch.zeros(40, K)
    for i, x in enumerate(X):
        z = [
            max(0.0, float(sum((x[c] - t["b_pre"][c]) * t["W_enc"][c, q] for c in range(C)) + t["b_enc"][q]))
            for q in range(K)
        ]
        z = [v if v > 0.3 else 0.0 for v in z]
        for q in sorted(range(K), key=lambda q: -z[q])[:2]:
            want[i, q] = z[q]
    torch.testing.assert_close(basis.transform(X), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(basis.components_, t["components"])
    assert basis.n_components_ == K


def test_user_basis_file_is_checked(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"components": torch.zeros(4, 3), "W_enc": torch.zeros(4, 3)}, str(bad))
    with pytest.raises(InputError, match=r"W_enc \(4, 3\) \(want \(3, 4\)\)"):
        UserBasis(str(bad)).fit(torch.zeros(2, 3))
    extra = tmp_path / "extra.safetensors"
    save_file({"components": torch.zeros(4, 3), "b_dec": torch.zeros(3)}, str(extra))
    with pytest.raises(InputError, match="b_dec"):
        UserBasis(str(extra)).fit(torch.zeros(2, 3))
    ok = tmp_path / "ok.safetensors"
    save_file({"components": torch.zeros(4, 3), "W_enc": torch.zeros(3, 4)}, str(ok))
    with pytest.raises(InputError, match="3 channels, layer None has 6"):
        UserBasis(str(ok)).fit(torch.zeros(2, 6))


@pytest.mark.parametrize("coder", ["lasso", "omp"])
def test_decoder_only_user_basis_uses_the_run_coder_at_the_run_sparsity(tmp_path, coder):
    from gig.decompose import encoder_for

    X = _clustered()
    V = KMeansBasis(6, seed=0).fit(X).components_
    path = tmp_path / "decoder.safetensors"
    save_file({"components": V}, str(path))
    config = Config(lasso_solver="fista", coder=coder)
    basis = UserBasis(str(path), target_l0=0.3, coder=coder_settings(config), calibration_size=200).fit(X)
    U = basis.transform(X)
    # λ is calibrated to l0 0.3 on 200 of the 300 rows: the others may exceed it a little.
    assert 0 < float((U != 0).float().mean()) <= 0.3 + 0.01
    torch.testing.assert_close(U, encoder_for(config, V, basis.alpha_).encode(X))


def test_dictionary_basis_meets_the_target_sparsity():
    X = _clustered()
    basis = DictionaryLearningBasis(
        6, target_l0=0.4, coder=coder_settings(Config(lasso_solver="fista")), calibration_size=150, n_iter=2
    ).fit(X)
    torch.testing.assert_close(basis.components_.norm(dim=1), torch.ones(6))
    assert basis.info_["calibration_l0_ratio"] <= 0.4
    assert basis.transform(X).shape == (300, 6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: KMeansBasis(5, seed=0),
        lambda: TopKSAEBasis(6, k=2, seed=0, steps=50),
        lambda: DictionaryLearningBasis(
            5, 0.5, coder_settings(Config(lasso_solver="fista")), calibration_size=100, n_iter=1
        ),
    ],
    ids=["kmeans", "sae", "dictionary"],
)
def test_save_load_round_trip(make, tmp_path):
    X = _clustered()
    basis = make().fit(X)
    basis.save(tmp_path / "b.safetensors")
    meta = load_json(tmp_path / "b.json")
    assert meta["method"] == basis.name and meta["params"] == basis.get_params()
    back = ConceptBasis.load(tmp_path / "b.safetensors")
    assert type(back) is type(basis) and back.info_ == basis.info_
    assert torch.equal(back.components_, basis.components_)
    assert torch.equal(back.transform(X), basis.transform(X))


def test_a_saved_basis_names_its_class(tmp_path):
    """A method name that comes to mean another implementation (``sae`` did) never loads the
    old fit as the new class."""
    KMeansBasis(3, seed=0).fit(_clustered()).save(tmp_path / "b.safetensors")
    meta = load_json(tmp_path / "b.json")
    assert meta["class"] == "gig.evaluation.methods.kmeans.KMeansBasis"
    (tmp_path / "b.json").write_text(json.dumps({**meta, "class": "elsewhere.OldKMeans"}))
    with pytest.raises(InputError, match="was saved by elsewhere.OldKMeans"):
        ConceptBasis.load(tmp_path / "b.safetensors")


def test_user_basis_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "u.safetensors"
    save_file({"components": torch.randn(6, 8, generator=g), "W_enc": torch.randn(8, 6, generator=g)}, str(path))
    X = _clustered()
    basis = UserBasis(str(path)).fit(X)
    basis.save(tmp_path / "saved.safetensors")
    back = ConceptBasis.load(tmp_path / "saved.safetensors")
    assert torch.equal(back.transform(X), basis.transform(X))


# ------------------------------------------------------------------------------ end to end
from conftest import TinyNet  # noqa: E402  stem → block1 (12 ch, 8×8) → block2 (16 ch, 4×4) → head


def _tiny_bundle():
    return wrap_module(TinyNet(), name="small", input_size=32, class_names=list("abcd"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("userbasis") / "run"
    config = Config(
        layers=["block1", "block2"],
        max_images=5,
        samples_per_image=8,
        min_cluster=4,
        n_steps=4,
        batch_size=5,
        internal_batch_size=32,
    )
    Pipeline(config, out, model=_tiny_bundle(), progress=False).run(["collect", "concepts", "decompose"])
    return out


def test_user_basis_from_the_command_line(tiny_run, tmp_path, monkeypatch):
    """A folder of per-layer files (an SAE-like encoder on block1, a bare decoder on block2)
    through ``gig evaluate -m user:FOLDER``."""
    import gig.models
    from gig.cli import app

    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "my-sae"
    folder.mkdir()
    save_file(
        {"components": torch.rand(10, 12, generator=g), "W_enc": torch.randn(12, 10, generator=g)},
        str(folder / "block1.safetensors"),
        metadata={"top_k": "3"},
    )
    save_file({"components": torch.rand(9, 16, generator=g)}, str(folder / "block2.safetensors"))
    monkeypatch.setattr(gig.models, "load_model", lambda *a, **k: _tiny_bundle())
    out = tmp_path / "ev"
    args = [
        "evaluate",
        str(tiny_run),
        "--extraction-images",
        "2",
        "--interlayer-images",
        "0",
        "-m",
        "ours",
        "-m",
        f"user:{folder}",
        "--out",
        str(out),
        "--no-plots",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ext = load_json(out / "extraction.json")
    b1, b2 = ext["layers"]["block1"]["user:my-sae"], ext["layers"]["block2"]["user:my-sae"]
    assert b1["K"] == 10 and b1["reconstruction"]["active_per_position"] <= 3 and b1["basis"]["encoder"]
    assert b2["K"] == 9 and b2["basis"]["kind"] == "user dictionary + the run's encoder"
    assert "vs_ours" in b1 and b1["auc_diff"]["n"] == 2
    bad = CliRunner().invoke(app, ["evaluate", str(tiny_run), "-m", "nmff", "--out", str(out)])
    assert bad.exit_code == 2 and "nmff" in bad.output


def _with_seed(basis, seed: int):
    basis.seed = seed
    return basis


def test_fitted_bases_are_reused_until_their_settings_change(tiny_run, tmp_path, monkeypatch):
    from gig.evaluation import evaluate_run
    from gig.evaluation.parts import resumable_parts

    out = tmp_path / "ev"
    base = dict(extraction_images=2, interlayer_images=0, methods=["kmeans", "sae-torch"], sae_steps=20, plots=False)
    first = evaluate_run(tiny_run, EvaluationSettings(**base, sae_k=2), model=_tiny_bundle(), out=out, progress=False)

    def refuse(self, X):
        raise AssertionError(f"{self.name} refitted")

    monkeypatch.setattr(KMeansBasis, "fit", refuse)
    again = evaluate_run(tiny_run, EvaluationSettings(**base, sae_k=2), model=_tiny_bundle(), out=out, progress=False)
    assert again["summary"] == first["summary"]  # bases and parts reused
    # sae_k is a setting the SAE uses: it alone is fitted again (k-means would raise)
    other = evaluate_run(tiny_run, EvaluationSettings(**base, sae_k=3), model=_tiny_bundle(), out=out, progress=False)
    assert other["extraction"]["layers"]["block1"]["sae-torch"]["basis"]["k"] == 3
    assert (
        other["extraction"]["layers"]["block1"]["kmeans"]["per_image"]
        == first["extraction"]["layers"]["block1"]["kmeans"]["per_image"]
    )
    # a hyper-parameter derived differently from the same settings (a changed for_layer) fits again
    derive = KMeansBasis.for_layer.__func__
    monkeypatch.setattr(KMeansBasis, "for_layer", classmethod(lambda cls, ctx: _with_seed(derive(cls, ctx), 7)))
    with pytest.raises(AssertionError, match="kmeans refitted"):
        evaluate_run(tiny_run, EvaluationSettings(**base, sae_k=3), model=_tiny_bundle(), out=out, progress=False)
    # the chunk loop: saved parts whose image ids match are loaded, not computed
    infos = [{"image_id": i} for i in range(5)]
    computed: list[list[int]] = []

    def compute(chunk):
        computed.append([i["image_id"] for i in chunk])
        return {"image_id": [i["image_id"] for i in chunk]}

    resumable_parts(tmp_path / "p", "x", infos, 2, compute, lambda chunk: None)
    resumable_parts(tmp_path / "p", "x", infos, 2, compute, lambda chunk: None)
    resumable_parts(tmp_path / "p", "x", infos[1:], 2, compute, lambda chunk: None)  # other ids: recomputed
    assert computed == [[0, 1], [2, 3], [4], [1, 2], [3, 4]]


@pytest.mark.parametrize(
    "settings, scale",
    [({"coder": "lasso"}, 3.0), ({"coder": "omp"}, 1.0), ({"coder": "lasso", "unit_atoms": True}, 1.0)],
)
def test_dictionary_fit_penalty_is_the_run_lambda_in_unit_atom_units(settings, scale):
    """The run's λ is in the concept vectors' units for the plain Lasso (divide by the median
    atom norm, here 3) and already in unit atoms' units for OMP and ``unit_atoms``."""
    from gig.evaluation.methods.dictionary import unit_atom_scale

    V = torch.randn(9, 4)
    V = V / V.norm(dim=1, keepdim=True) * torch.linspace(2.0, 4.0, 9)[:, None]
    assert unit_atom_scale(V, Config(**settings)) == pytest.approx(scale)
