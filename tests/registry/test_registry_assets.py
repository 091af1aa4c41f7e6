"""Uploading adapter files through the registry: validation at the door, atomic install, nothing left
behind by a refusal, readiness, resolving a finetune for a run request, and the startup recovery that
repairs what a crash left (the crashes themselves, on a real server process: test_crash.py)."""

from __future__ import annotations

import io
import shutil
import sqlite3
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from loraserve.errors import FinetuneNotFound, InvalidFinetune, WorkersAIError
from loraserve.registry import BUCKET_NAME, AssetFile, Finetune, Registry, RegistryLimits, synth
from loraserve.registry.recovery import RegistryCorrupt
from loraserve.types import LORA_TARGETS, AdapterRef

BASE = synth.llama_model_info()
MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
CONFIG, WEIGHTS = AssetFile.CONFIG.value, AssetFile.WEIGHTS.value
A0 = synth.lora_name(0, "q_proj", "A")
B0 = synth.lora_name(0, "q_proj", "B")


def weights(r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0) -> bytes:
    return synth.encode_safetensors(synth.lora_tensors(BASE, r, targets=targets, seed=seed))


def config(r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), **extra: object) -> bytes:
    return synth.adapter_config(r, 2 * r, targets, **extra)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path / "data", limits=RegistryLimits(max_rank=8, max_file_bytes=8 * 1024)) as r:
        for account in ("alice", "bob"):
            r.create_token(account)
        yield r


@pytest.fixture
def ft(reg: Registry) -> Finetune:
    return reg.create_finetune("alice", MODEL, "mine")


def upload(reg: Registry, ref: str, file_name: str, blob: bytes, account: str = "alice") -> None:
    reg.add_asset(account, ref, file_name, io.BytesIO(blob), BASE)


def snapshot(reg: Registry, ft: Finetune) -> tuple[dict[str, bytes], Finetune]:
    """The finetune's directory, byte for byte, and its record."""
    d = reg.storage.directory(ft.id)
    files = {p.name: p.read_bytes() for p in d.iterdir()} if d.exists() else {}
    return files, reg.get_finetune("alice", ft.id)


def test_both_files_make_a_ready_adapter(reg: Registry, ft: Finetune) -> None:
    asset = reg.add_asset("alice", "mine", CONFIG, io.BytesIO(config()), BASE)
    assert asset.to_api() == {
        "id": asset.id,
        "finetune_id": ft.id,
        "file_name": CONFIG,
        "bucket_name": BUCKET_NAME,
        "created_at": asset.created_at,
        "modified_at": asset.modified_at,
    }
    half = reg.get_finetune("alice", ft.id)
    assert (half.has_config, half.has_weights, half.ready) == (True, False, False)
    with pytest.raises(
        InvalidFinetune, match=f"finetune mine .{ft.id}. is missing adapter_model.safetensors"
    ) as info:
        reg.adapter_for("alice", MODEL, "mine")
    assert (info.value.code, info.value.status) == (3039, 400)
    upload(reg, ft.id, WEIGHTS, weights())
    got, ref = reg.adapter_for("alice", MODEL, "mine")
    assert got.ready and got.modified_at >= ft.modified_at
    assert ref == AdapterRef(key=ft.id, path=str(reg.storage.directory(ft.id)))
    assert sorted(p.name for p in Path(ref.path).iterdir()) == [CONFIG, WEIGHTS]
    assert (Path(ref.path) / CONFIG).read_bytes() == config()


def test_weights_first_then_config(reg: Registry, ft: Finetune) -> None:
    upload(reg, "mine", WEIGHTS, weights())
    with pytest.raises(InvalidFinetune, match=r"is missing adapter_config\.json"):
        reg.adapter_for("alice", MODEL, "mine")
    upload(reg, "mine", CONFIG, config())
    assert reg.adapter_for("alice", MODEL, ft.id)[0].ready


def test_nothing_uploaded_names_both_files(reg: Registry, ft: Finetune) -> None:
    with pytest.raises(InvalidFinetune, match=r"missing adapter_config\.json and adapter_model\.safetensors"):
        reg.adapter_for("alice", MODEL, ft.id)


def _bad_weights() -> dict[str, bytes]:
    good = weights()
    overlap = {
        A0: {"dtype": "F32", "shape": [1, 16], "data_offsets": [32, 96]},
        B0: {"dtype": "F32", "shape": [16, 1], "data_offsets": [64, 128]},
    }
    nan = synth.lora_tensors(BASE, 4)
    nan[B0][0, 0] = np.nan
    inf = synth.lora_tensors(BASE, 4)
    inf[A0][1, 1] = np.inf
    wrong = synth.lora_tensors(BASE, 4)
    wrong[A0] = np.zeros((4, 15), np.float32)
    extra = synth.lora_tensors(BASE, 4)
    extra["base_model.model.lm_head.weight"] = np.zeros((64, 16), np.float32)
    missing_b = synth.lora_tensors(BASE, 4)
    del missing_b[B0]
    return {
        "truncated": good[: len(good) // 2],
        "header length > file": struct.pack("<Q", len(good)) + good[8:],
        "overlapping offsets": synth.raw_safetensors(overlap, bytes(128)),
        "out-of-range offsets": synth.raw_safetensors(
            {
                A0: {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]},
                B0: {"dtype": "F32", "shape": [16, 1], "data_offsets": [64, 128]},
            },
            bytes(100),
        ),
        "unknown dtype": synth.raw_safetensors(
            {
                A0: {"dtype": "I32", "shape": [1, 16], "data_offsets": [0, 64]},
                B0: {"dtype": "F32", "shape": [16, 1], "data_offsets": [64, 128]},
            },
            bytes(128),
        ),
        "NaN": synth.encode_safetensors(nan),
        "Inf": synth.encode_safetensors(inf),
        "wrong shape": synth.encode_safetensors(wrong),
        "extra tensor": synth.encode_safetensors(extra),
        "missing B": synth.encode_safetensors(missing_b),
        "rank over the limit": weights(r=9),
        "rank disagrees with the config": weights(r=2),
        "module the config does not target": weights(targets=("q_proj", "v_proj", "k_proj")),
        "empty": b"",
    }


_BAD_CONFIGS = {
    "bad JSON": b'{"r": 4,',
    "DoRA": config(use_dora=True),
    "unknown target module": config(targets=("q_proj", "lm_head")),
    "rank over the limit": config(r=9),
    "rank disagrees with the weights": config(r=2),
    "target without tensors": config(targets=("q_proj", "v_proj", "o_proj")),
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(_bad_weights()))
def test_refused_weights_leave_nothing_behind(reg: Registry, ft: Finetune, case: str) -> None:
    upload(reg, "mine", CONFIG, config())
    before = snapshot(reg, ft)
    with pytest.raises(InvalidFinetune) as info:
        upload(reg, "mine", WEIGHTS, _bad_weights()[case])
    assert info.value.code == 3039
    assert snapshot(reg, ft) == before
    # And a good file is still accepted afterwards.
    upload(reg, "mine", WEIGHTS, weights())
    assert reg.get_finetune("alice", "mine").ready


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_refused_configs_leave_nothing_behind(reg: Registry, ft: Finetune, case: str) -> None:
    upload(reg, "mine", WEIGHTS, weights())
    before = snapshot(reg, ft)
    with pytest.raises(InvalidFinetune, match="adapter_") as info:
        upload(reg, "mine", CONFIG, _BAD_CONFIGS[case])
    assert info.value.code == 3039
    assert snapshot(reg, ft) == before


def test_refused_first_upload_leaves_an_empty_directory(reg: Registry, ft: Finetune) -> None:
    with pytest.raises(InvalidFinetune, match="DoRA"):
        upload(reg, "mine", CONFIG, config(use_dora=True))
    assert snapshot(reg, ft) == ({}, ft)


def test_file_name_must_be_one_of_the_two(reg: Registry, ft: Finetune) -> None:
    for name in ("adapter_model.bin", "../adapter_config.json", "ADAPTER_CONFIG.JSON", ""):
        with pytest.raises(
            InvalidFinetune, match=r"file_name must be adapter_config\.json or adapter_model\.safetensors"
        ):
            upload(reg, "mine", name, config())
    assert snapshot(reg, ft) == ({}, ft)


def test_size_limits(reg: Registry, ft: Finetune) -> None:
    big = weights(r=8, targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "o_proj", "k_proj"))
    assert len(big) > 8 * 1024
    with pytest.raises(InvalidFinetune, match=f"{WEIGHTS}: file exceeds 8192 bytes"):
        upload(reg, "mine", WEIGHTS, big)
    with pytest.raises(InvalidFinetune, match=f"{CONFIG}: file exceeds 8192 bytes"):
        upload(reg, "mine", CONFIG, config()[:-1] + b" " * 9000 + b"}")
    assert snapshot(reg, ft) == ({}, ft)


def test_config_is_capped_at_one_megabyte_whatever_the_file_limit(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as reg:
        reg.create_token("alice")
        f = reg.create_finetune("alice", MODEL, "mine")
        with pytest.raises(InvalidFinetune, match=f"{CONFIG}: file exceeds 1048576 bytes"):
            upload(reg, "mine", CONFIG, config()[:-1] + b" " * (1 << 20) + b"}")
        assert snapshot(reg, f) == ({}, f)


def test_reupload_replaces_atomically(reg: Registry, ft: Finetune) -> None:
    upload(reg, "mine", CONFIG, config())
    first = reg.add_asset("alice", "mine", WEIGHTS, io.BytesIO(weights(seed=1)), BASE)
    second = reg.add_asset("alice", "mine", WEIGHTS, io.BytesIO(weights(seed=2)), BASE)
    assert (second.id, second.created_at) == (first.id, first.created_at)
    assert second.modified_at >= first.modified_at
    files, record = snapshot(reg, ft)
    assert files == {CONFIG: config(), WEIGHTS: weights(seed=2)}
    assert record.ready
    with pytest.raises(InvalidFinetune):
        upload(reg, "mine", WEIGHTS, weights(r=2))
    assert snapshot(reg, ft) == (files, record)


def test_delete_removes_the_files(reg: Registry, ft: Finetune) -> None:
    upload(reg, "mine", CONFIG, config())
    upload(reg, "mine", WEIGHTS, weights())
    reg.delete_finetune("alice", "mine")
    assert not reg.storage.directory(ft.id).exists()
    with pytest.raises(FinetuneNotFound):
        upload(reg, ft.id, CONFIG, config())
    assert not reg.storage.directory(ft.id).exists()


def test_files_without_a_committed_row_are_not_usable(reg: Registry, ft: Finetune, tmp_path: Path) -> None:
    # As if the process died between the rename and the commit: the file is there, the DB never vouched.
    d = reg.storage.directory(ft.id)
    d.mkdir(parents=True)
    (d / CONFIG).write_bytes(config())
    (d / WEIGHTS).write_bytes(weights(r=2))  # does not even match the config
    assert not reg.get_finetune("alice", "mine").ready
    with pytest.raises(InvalidFinetune, match=r"missing adapter_config\.json and adapter_model\.safetensors"):
        reg.adapter_for("alice", MODEL, "mine")
    upload(reg, "mine", CONFIG, config())  # not cross-checked against the unvouched weights
    with pytest.raises(InvalidFinetune, match=r"missing adapter_model\.safetensors"):
        reg.adapter_for("alice", MODEL, "mine")


def test_rows_whose_files_vanished_are_not_ready(reg: Registry, ft: Finetune) -> None:
    upload(reg, "mine", CONFIG, config())
    upload(reg, "mine", WEIGHTS, weights())
    (reg.storage.directory(ft.id) / WEIGHTS).unlink()
    assert not reg.get_finetune("alice", "mine").ready
    with pytest.raises(InvalidFinetune, match=r"missing adapter_model\.safetensors"):
        reg.adapter_for("alice", MODEL, "mine")
    upload(reg, "mine", WEIGHTS, weights())
    assert reg.adapter_for("alice", MODEL, "mine")[0].ready


def test_adapter_for_checks_visibility_and_model(reg: Registry) -> None:
    plain = reg.create_finetune("alice", "@cf/meta-llama/llama-2-7b-chat-hf", "plain", public=True)
    private = reg.create_finetune("alice", MODEL, "private")
    for f in (plain, private):
        upload(reg, f.id, CONFIG, config())
        upload(reg, f.id, WEIGHTS, weights())
    assert reg.adapter_for("alice", MODEL, "plain")[0] == reg.get_finetune(
        "alice", plain.id
    )  # "-lora" normalised
    assert reg.adapter_for("alice", "@cf/meta-llama/llama-2-7b-chat-hf", "private")[0].id == private.id
    assert reg.adapter_for("bob", MODEL, plain.id)[1].key == plain.id  # public: usable by others
    assert reg.adapter_for("bob", MODEL, "plain")[1].key == plain.id
    with pytest.raises(FinetuneNotFound):
        reg.adapter_for("bob", MODEL, private.id)
    with pytest.raises(FinetuneNotFound):
        reg.adapter_for("alice", "@cf/mistral/mistral-7b-instruct-v0.2-lora", "private")
    for ref in ("", "nope", "x" * 5000):
        with pytest.raises(FinetuneNotFound):
            reg.adapter_for("alice", MODEL, ref)


def test_only_the_owner_uploads(reg: Registry) -> None:
    public = reg.create_finetune("alice", MODEL, "open", public=True)
    private = reg.create_finetune("alice", MODEL, "closed")
    for f in (public, private):
        for ref in (f.id, f.name):
            with pytest.raises(FinetuneNotFound):
                upload(reg, ref, CONFIG, config(), account="bob")
        assert not reg.storage.directory(f.id).exists()


def test_concurrent_uploads_of_a_mismatched_pair_refuse_one(reg: Registry) -> None:
    for i in range(4):
        f = reg.create_finetune("alice", MODEL, f"race{i}")
        outcomes: list[str] = []

        def send(name: str, blob: bytes, f: Finetune = f, outcomes: list[str] = outcomes) -> None:
            try:
                upload(reg, f.id, name, blob)
                outcomes.append("ok")
            except WorkersAIError as exc:
                outcomes.append(exc.message)

        threads = [
            threading.Thread(target=send, args=(CONFIG, config(r=4))),
            threading.Thread(target=send, args=(WEIGHTS, weights(r=2))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o == "ok" for o in outcomes) == [False, True], outcomes
        assert not reg.get_finetune("alice", f.id).ready


def test_peft_written_adapters(tmp_path: Path, peft_adapters: dict[str, Path]) -> None:
    reg = Registry.open(tmp_path, limits=RegistryLimits(max_rank=8))
    reg.create_token("alice")
    for case, folder in peft_adapters.items():
        f = reg.create_finetune("alice", MODEL, case)
        for name in (CONFIG, WEIGHTS):
            with open(folder / name, "rb") as src:
                if case == "dora":
                    with pytest.raises(InvalidFinetune, match=r"DoRA|lora_magnitude_vector"):
                        reg.add_asset("alice", f.id, name, src, BASE)
                else:
                    reg.add_asset("alice", f.id, name, src, BASE)
        assert reg.get_finetune("alice", case).ready == (case != "dora"), case
    reg.close()


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT output for a tiny Llama with BASE's shapes (the only part that imports torch)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
    )
    cases = {
        "basic": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "patterns": LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=list(LORA_TARGETS),
            rank_pattern={"v_proj": 2},
            alpha_pattern={"o_proj": 4},
            layers_to_transform=[1],
            use_rslora=True,
        ),
        "all-linear": LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
    }
    root = tmp_path_factory.mktemp("peft")
    out = {}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation notices, not ours
        for name, lora in cases.items():
            model = get_peft_model(LlamaForCausalLM(hf), lora)
            if name == "basic":
                model = model.to(torch.bfloat16)
            model.save_pretrained(str(root / name))
            out[name] = root / name
    return out


def test_peft_fixture_really_is_bf16_and_sparse(peft_adapters: dict[str, Path]) -> None:
    from loraserve.registry.validate import read_adapter_tensors

    basic = read_adapter_tensors(peft_adapters["basic"] / WEIGHTS, BASE, RegistryLimits())
    assert {t.dtype for t in basic.tensors} == {"BF16"}
    sparse = read_adapter_tensors(peft_adapters["patterns"] / WEIGHTS, BASE, RegistryLimits())
    assert {m.layer for m in sparse.modules} == {1} and len(sparse.modules) == 7
    assert {m.proj: m.rank for m in sparse.modules}["v_proj"] == 2


def test_adapter_path_is_absolute_whatever_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Registry.open(Path("relative")) as reg:
        reg.create_token("alice")
        reg.create_finetune("alice", MODEL, "mine")
        upload(reg, "mine", CONFIG, config())
        upload(reg, "mine", WEIGHTS, weights())
        ref = reg.adapter_for("alice", MODEL, "mine")[1]
    assert Path(ref.path).is_absolute()
    assert Path(ref.path) == tmp_path.resolve() / "relative" / "finetunes" / ref.key
    assert (Path(ref.path) / WEIGHTS).read_bytes() == weights()


# Startup recovery (registry/recovery.py): what a kill -9 can leave, repaired on real files and SQLite.


def ready_pair(reg: Registry, ft: Finetune) -> Path:
    upload(reg, "mine", CONFIG, config())
    upload(reg, "mine", WEIGHTS, weights())
    return reg.storage.directory(ft.id)


def asset_rows(reg: Registry, ft: Finetune) -> dict[str, tuple[int, str]]:
    with sqlite3.connect(reg.data_dir / "registry.sqlite3") as db:
        rows = db.execute("SELECT file_name, size_bytes, sha256 FROM finetune_assets WHERE finetune_id = ?",
                          (ft.id,)).fetchall()
        flags = db.execute("SELECT has_config, has_weights FROM finetunes WHERE id = ?", (ft.id,)).fetchone()
    db.close()
    assert {CONFIG: bool(flags[0]), WEIGHTS: bool(flags[1])} == {name: name in {r[0] for r in rows}
                                                                  for name in (CONFIG, WEIGHTS)}
    return {r[0]: (r[1], r[2]) for r in rows}


def test_recovery_of_a_clean_registry_changes_nothing(reg: Registry, ft: Finetune) -> None:
    d = ready_pair(reg, ft)
    reg.create_finetune("alice", MODEL, "empty")
    before = snapshot(reg, ft)
    report = reg.recover()
    assert report.clean and report.finetunes_checked == 2
    assert "nothing to repair" in report.summary()
    assert snapshot(reg, ft) == before and sorted(p.name for p in d.iterdir()) == [CONFIG, WEIGHTS]
    assert not (reg.storage.root / reg.get_finetune("alice", "empty").id).exists()


def test_recovery_removes_dead_temp_files_but_not_live_ones(reg: Registry, ft: Finetune) -> None:
    d = ready_pair(reg, ft)
    dead = d / ".upload-0123456789abcdef.tmp"  # a killed upload: nobody holds its lock
    dead.write_bytes(b"half an upload")
    live = reg.storage.receive(ft.id, AssetFile.WEIGHTS, io.BytesIO(weights(seed=1)), 1 << 20)
    try:
        report = reg.recover()
        assert report.temp_files_removed == [dead] and not dead.exists()
        assert live.path.exists()  # another process's upload in progress is left alone
        assert "1 dead temp files removed" in report.summary()
    finally:
        reg.storage.discard(live)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG, WEIGHTS]
    assert reg.get_finetune("alice", "mine").ready


def test_recovery_removes_directories_of_deleted_finetunes(reg: Registry, ft: Finetune) -> None:
    d = ready_pair(reg, ft)
    orphan = reg.storage.root / str(uuid.uuid4())  # killed between a delete's commit and its rmtree
    shutil.copytree(d, orphan)
    stray = reg.storage.root / "not-a-finetune"  # not ours: never touched
    stray.mkdir()
    report = reg.recover()
    assert report.orphan_dirs_removed == [orphan.name] and not orphan.exists()
    assert stray.exists() and d.exists() and reg.get_finetune("alice", "mine").ready


def test_recovery_keeps_orphans_when_the_finetunes_table_is_empty(tmp_path: Path) -> None:
    # A fresh (or wrong) database over a data dir full of adapters: nothing is deleted.
    with Registry.open(tmp_path / "data") as reg:
        orphan = reg.storage.root / str(uuid.uuid4())
        orphan.mkdir(parents=True)
        (orphan / CONFIG).write_bytes(config())
        report = reg.recover()
        assert report.orphan_dirs_kept == [orphan.name] and report.orphan_dirs_removed == []
        assert (orphan / CONFIG).exists() and "KEPT" in report.summary()


def test_recovery_removes_files_the_database_never_vouched_for(reg: Registry, ft: Finetune) -> None:
    # Killed between the rename and the commit of a first upload: the flag stayed false.
    upload(reg, "mine", CONFIG, config())
    d = reg.storage.directory(ft.id)
    (d / WEIGHTS).write_bytes(weights())
    (d / f".installing-{WEIGHTS}").touch()
    report = reg.recover()
    assert report.unvouched_files_removed == [d / WEIGHTS]
    assert sorted(p.name for p in d.iterdir()) == [CONFIG]
    assert reg.get_finetune("alice", "mine").has_config
    upload(reg, "mine", WEIGHTS, weights())
    assert reg.get_finetune("alice", "mine").ready


def test_recovery_settles_an_intent_whose_commit_happened(reg: Registry, ft: Finetune) -> None:
    # Killed after the commit, before the marker was removed: the file is what the database recorded.
    d = ready_pair(reg, ft)
    marker = d / f".installing-{WEIGHTS}"
    marker.touch()
    rows = asset_rows(reg, ft)
    report = reg.recover()
    assert report.intents_resolved == [marker] and "1 interrupted installs resolved" in report.summary()
    assert report.files_invalidated == [] and report.unvouched_files_removed == []
    assert sorted(p.name for p in d.iterdir()) == [CONFIG, WEIGHTS]
    assert asset_rows(reg, ft) == rows and reg.get_finetune("alice", "mine").ready


def test_recovery_invalidates_a_reupload_whose_commit_never_happened(reg: Registry, ft: Finetune) -> None:
    # Killed between the rename and the commit of a re-upload: same size, other bytes, the database
    # still describes the old file. Only the sha256 (checked because of the marker) tells them apart.
    d = ready_pair(reg, ft)
    assert len(weights(seed=5)) == len(weights())
    (d / WEIGHTS).write_bytes(weights(seed=5))
    (d / f".installing-{WEIGHTS}").touch()
    report = reg.recover()
    assert report.files_invalidated == [
        (ft.id, AssetFile.WEIGHTS, "replaced by an upload whose commit never happened")
    ]
    assert sorted(p.name for p in d.iterdir()) == [CONFIG]
    assert set(asset_rows(reg, ft)) == {CONFIG}
    with pytest.raises(InvalidFinetune, match=r"missing adapter_model\.safetensors"):
        reg.adapter_for("alice", MODEL, "mine")
    upload(reg, "mine", WEIGHTS, weights(seed=5))
    assert reg.adapter_for("alice", MODEL, "mine")[0].ready


@pytest.mark.parametrize("damage", ["truncated", "missing", "bad header", "bad config"])
def test_recovery_invalidates_vouched_files_that_fail_the_cheap_checks(
    reg: Registry, ft: Finetune, damage: str
) -> None:
    d = ready_pair(reg, ft)
    file, why = {
        "truncated": (WEIGHTS, f"file is 100 bytes, {len(weights())} recorded"),
        "missing": (WEIGHTS, "file missing"),
        "bad header": (WEIGHTS, "safetensors header length is out of bounds"),
        "bad config": (CONFIG, "config is not a JSON object"),
    }[damage]
    blob = (d / file).read_bytes()
    if damage == "truncated":
        (d / file).write_bytes(blob[:100])
    elif damage == "missing":
        (d / file).unlink()
    elif damage == "bad header":
        (d / file).write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    else:
        (d / file).write_bytes(b"[" + b" " * (len(blob) - 2) + b"]")
    report = reg.recover()
    assert report.files_invalidated == [(ft.id, AssetFile(file), why)]
    assert not (d / file).exists() and set(asset_rows(reg, ft)) == {CONFIG, WEIGHTS} - {file}
    assert not reg.get_finetune("alice", "mine").ready
    assert reg.recover().clean  # repaired once, for good


def test_a_commit_that_fails_after_the_rename_takes_the_file_back(reg: Registry, ft: Finetune) -> None:
    upload(reg, "mine", CONFIG, config())
    failures = []

    def fail_once(_session: object) -> None:
        if not failures:
            failures.append(1)
            raise OSError("disk I/O error")

    event.listen(reg._sessions, "before_commit", fail_once)
    try:
        with pytest.raises(OSError, match="disk I/O error"):
            upload(reg, "mine", WEIGHTS, weights())
    finally:
        event.remove(reg._sessions, "before_commit", fail_once)
    d = reg.storage.directory(ft.id)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG]  # no file, no marker, no temp file
    assert not reg.get_finetune("alice", "mine").has_weights and reg.recover().clean
    upload(reg, "mine", WEIGHTS, weights())
    assert reg.get_finetune("alice", "mine").ready


def test_recovery_refuses_a_corrupt_database(tmp_path: Path) -> None:
    with Registry.open(tmp_path / "data") as reg:
        reg.create_token("alice")
        for i in range(50):  # a few pages of rows
            reg.create_finetune("alice", MODEL, f"ft-{i}", description="x" * 200)
        assert reg.recover().clean
    db = tmp_path / "data" / "registry.sqlite3"
    with sqlite3.connect(db) as conn:  # the last connection closed: the WAL is checkpointed
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'finetunes'").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:  # scribble over the finetunes table's root page
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    with Registry.open(tmp_path / "data") as reg, pytest.raises(RegistryCorrupt, match="quick_check"):
        reg.recover()
