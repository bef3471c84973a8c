from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapters.base import BaseModelProfile
from adapters.errors import AdapterError
from adapters.validation import validate_adapter
from core.artifact import ManifestDraft, SourceModel, folder_digest, write_artifact
from tests.support.lora import ALL_LINEAR, build_lora_adapter


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_good_adapter_is_described(
    good_adapter: Path, profile: BaseModelProfile, tiny_model_dir: Path
) -> None:
    info = validate_adapter(good_adapter, profile, max_lora_rank=8)
    assert info.rank == 8
    assert info.alpha == 16
    assert info.base_model == str(tiny_model_dir)
    assert info.num_tensors == 2 * 7 * 2  # A and B for 7 modules in 2 layers
    assert set(info.target_modules) == set(ALL_LINEAR)


def test_truncated_weights_are_refused(good_adapter: Path, profile: BaseModelProfile, tmp_path: Path) -> None:
    bad = _copy(good_adapter, tmp_path / "truncated")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors are unreadable"):
        validate_adapter(bad, profile, max_lora_rank=8)


def test_wrong_base_is_refused(wrong_base_adapter: Path, profile: BaseModelProfile) -> None:
    with pytest.raises(AdapterError, match="different model from the served tiny"):
        validate_adapter(wrong_base_adapter, profile, max_lora_rank=8)


def test_rank_above_the_limit_is_refused(good_adapter: Path, profile: BaseModelProfile) -> None:
    with pytest.raises(AdapterError, match="rank 8, above the server's --max-lora-rank 4"):
        validate_adapter(good_adapter, profile, max_lora_rank=4)


def test_a_copy_of_the_base_elsewhere_is_the_same_base(
    good_adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    copy = _copy(tiny_model_dir, tmp_path / "base-copy")
    other_profile = BaseModelProfile.from_dir(copy, "copy")
    assert validate_adapter(good_adapter, other_profile, max_lora_rank=8).rank == 8


def test_hub_style_base_name_matches_the_served_name(
    good_adapter: Path, profile: BaseModelProfile, tmp_path: Path
) -> None:
    bad = _copy(good_adapter, tmp_path / "hub")
    _edit_config(bad, base_model_name_or_path="SomeOrg/tiny")
    assert validate_adapter(bad, profile, max_lora_rank=8).base_model == "SomeOrg/tiny"
    _edit_config(bad, base_model_name_or_path="SomeOrg/other-model")
    with pytest.raises(AdapterError, match="--served-model-name SomeOrg/other-model"):
        validate_adapter(bad, profile, max_lora_rank=8)


def test_manifest_source_digest_decides(
    good_adapter: Path,
    profile: BaseModelProfile,
    tiny_model_dir: Path,
    tiny_model_dir_b: Path,
    tmp_path: Path,
) -> None:
    def artifact(dest: Path, base: Path) -> Path:
        def populate(tmp: Path) -> ManifestDraft:
            for f in good_adapter.iterdir():
                shutil.copy(f, tmp / f.name)
            return ManifestDraft(
                kind="lora", source=SourceModel(path="elsewhere", digest=folder_digest(base))
            )

        write_artifact(dest, populate)
        return dest

    good = artifact(tmp_path / "ok", tiny_model_dir)
    assert validate_adapter(good, profile, max_lora_rank=8).rank == 8
    with pytest.raises(AdapterError, match="was trained on elsewhere"):
        validate_adapter(artifact(tmp_path / "bad", tiny_model_dir_b), profile, max_lora_rank=8)


def test_unknown_target_module_is_refused(
    good_adapter: Path, profile: BaseModelProfile, tmp_path: Path
) -> None:
    bad = _copy(good_adapter, tmp_path / "targets")
    _edit_config(bad, target_modules=["q_proj", "c_attn"])
    with pytest.raises(AdapterError, match="target modules c_attn do not exist"):
        validate_adapter(bad, profile, max_lora_rank=8)


def test_weight_shape_mismatch_is_refused(
    good_adapter: Path, profile: BaseModelProfile, tmp_path: Path
) -> None:
    bad = _copy(good_adapter, tmp_path / "shapes")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :64].contiguous()
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"has shape \[8, 64\], the base model needs \[8, 128\]"):
        validate_adapter(bad, profile, max_lora_rank=8)


def test_adapter_for_a_wider_model_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.support.tiny_model import build_model

    wide = tmp_path / "wide"
    build_model(wide, seed=0, hidden_size=256)
    adapter = build_lora_adapter(wide, tmp_path / "wide-adapter", seed=3)
    _edit_config(adapter, base_model_name_or_path=None)  # only the shapes can tell
    profile = BaseModelProfile.from_dir(tiny_model_dir, "tiny")
    with pytest.raises(AdapterError, match="the base model needs"):
        validate_adapter(adapter, profile, max_lora_rank=8)


def test_nan_weights_are_refused(good_adapter: Path, profile: BaseModelProfile, tmp_path: Path) -> None:
    bad = _copy(good_adapter, tmp_path / "nan")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        validate_adapter(bad, profile, max_lora_rank=8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"peft_type": "IA3"}, "not a LoRA adapter"), ({"use_dora": True}, "DoRA")],
)
def test_non_lora_configs_are_refused(
    good_adapter: Path, profile: BaseModelProfile, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    bad = _copy(good_adapter, tmp_path / "kind")
    _edit_config(bad, **changes)
    with pytest.raises(AdapterError, match=message):
        validate_adapter(bad, profile, max_lora_rank=8)


def test_missing_files_are_refused(good_adapter: Path, profile: BaseModelProfile, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        validate_adapter(tmp_path, profile, max_lora_rank=8)
    bad = _copy(good_adapter, tmp_path / "noweights")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no weights file"):
        validate_adapter(bad, profile, max_lora_rank=8)


def test_an_adapter_artifact_with_an_altered_file_is_refused(
    good_adapter: Path, profile: BaseModelProfile, tiny_model_dir: Path, tmp_path: Path
) -> None:
    def populate(tmp: Path) -> ManifestDraft:
        for f in good_adapter.iterdir():
            shutil.copy(f, tmp / f.name)
        return ManifestDraft(kind="lora", source=SourceModel(path="x", digest=folder_digest(tiny_model_dir)))

    adapter = tmp_path / "artifact"
    write_artifact(adapter, populate)
    _edit_config(adapter, lora_alpha=32)
    with pytest.raises(AdapterError, match=r"is corrupt: file adapter_config\.json has sha256"):
        validate_adapter(adapter, profile, max_lora_rank=8)
