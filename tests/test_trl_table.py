"""docs/trl_migration.md's table of TRL's fields against the installed trl *and* transformers: every
field of trl.GRPOConfig and of the transformers.TrainingArguments it inherits has a row; a row
names a field that exists (or a name the code maps on purpose); and every default of a shared
field that differs from TRL 1.16's is listed in its row, with no stale default claims left."""
import dataclasses
import os
import re

import pytest

from grpo_fast import GRPOConfig
from grpo_fast import config as config_mod

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# names the code accepts that neither the installed trl nor transformers has as a field
EXTRA_NAMES = {"activation_checkpointing": "a key of transformers' fsdp_config, the name it recommends over "
                                           "gradient_checkpointing with FSDP"}
DEFAULT = re.compile(r"default `([^`]*)` here \(TRL: `([^`]*)`")


def rows():
    out = {}
    with open(os.path.join(ROOT, "docs", "trl_migration.md")) as fh:
        for line in fh:
            m = re.match(r"^\| `([a-z0-9_]+)` \| ([^|]+)\|(.*)\|\s*$", line)
            if m:
                out[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return out


def default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_every_field_of_the_installed_trl_and_transformers_has_a_row():
    table = rows()
    trl_fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    hf_fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    missing = sorted((trl_fields | hf_fields) - set(table))
    assert not missing, f"fields of trl {trl.__version__} / transformers {transformers.__version__} without a row: {missing}"


def test_no_row_names_a_field_that_is_gone():
    table = rows()
    known = {f.name for f in dataclasses.fields(trl.GRPOConfig)} | {f.name for f in dataclasses.fields(
        transformers.TrainingArguments)}
    # the asynchronous-rollout table names TRL's experimental AsyncGRPOConfig fields
    from trl.experimental.async_grpo.async_grpo_config import AsyncGRPOConfig
    known |= {f.name for f in dataclasses.fields(AsyncGRPOConfig)}
    stale = sorted(set(table) - known - set(EXTRA_NAMES))
    assert not stale, f"rows for names that are not fields of the installed trl / transformers: {stale}"
    for name in EXTRA_NAMES:   # an extra name is accepted by the code, and its row says why it is extra
        assert name in config_mod.TRL_ALIASES or name in GRPOConfig.field_names(), name
        assert "not a field" in table[name][1], table[name]


def test_activation_checkpointing_is_gradient_checkpointing():
    assert GRPOConfig(activation_checkpointing=True).gradient_checkpointing
    assert GRPOConfig(activation_checkpointing=False).gradient_checkpointing is False
    assert GRPOConfig.from_dict({"activation_checkpointing": "true"}).gradient_checkpointing


def test_every_default_that_differs_from_trl_is_listed():
    table = rows()
    ours = {f.name: default(f) for f in dataclasses.fields(GRPOConfig)}
    theirs = {f.name: default(f) for f in dataclasses.fields(trl.GRPOConfig)}
    for name, trl_default in theirs.items():
        status, notes = table[name]
        if status != "same":
            continue
        claimed = DEFAULT.search(notes)
        if ours[name] == trl_default:
            assert claimed is None, f"{name}: the row claims a default difference that is gone: {notes!r}"
            continue
        assert claimed is not None, (f"{name}: default {ours[name]!r} here, {trl_default!r} in TRL, and the row does "
                                     f"not say so (write 'default `{ours[name]}` here (TRL: `{trl_default}`)')")
        assert claimed.groups() == (str(ours[name]), str(trl_default)), (name, claimed.groups())
