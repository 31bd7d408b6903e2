"""The set-up fingerprint a study keeps (budget, objective, epochs, data, precision, ...): a stored study is
continued only with its own."""

from __future__ import annotations

import optuna

from search.errors import SearchError


# What a study made before --max-macs, --max-activation-bytes, --max-model-bytes and --size-metric searched under.
BEFORE_BUDGETS = {"max_macs": None, "max_activation_bytes": None, "max_model_bytes": None, "size_metric": "params"}


def check_setup(storage, study_name: str, setup: dict) -> None:
    """Refuse to continue a stored study with a set-up (budget, objective, epochs, ...) other than its own."""
    if study_name not in optuna.get_all_study_names(storage):
        return
    stored = optuna.load_study(study_name=study_name, storage=storage).user_attrs.get("setup")
    if stored is not None and "dataset" not in stored:  # made before --dataset existed: it is an MNIST study
        stored = {**stored, "dataset": {"name": "mnist"}}
        setup = {**setup, "dataset": {"name": setup.get("dataset", {}).get("name", "mnist")}}
    if stored is not None and "size_metric" not in stored:  # made before these budgets: parameters alone
        stored = {**BEFORE_BUDGETS, **stored}
    # Keys a study stored: an older study, made before a key was added, is compared on the keys it has.
    changed = {k: v for k, v in setup.items() if k in (stored or {}) and stored[k] != v}
    if not changed:
        return
    if "dataset" in changed and stored["dataset"].get("name") == setup["dataset"].get("name"):
        changed["dataset"] = {"name": f"{setup['dataset'].get('name')} with other files (md5 sums differ)"}
    diff = ", ".join(f"{k} was {_show(k, stored.get(k))}, now {_show(k, v)}" for k, v in changed.items())
    raise SearchError(f"study {study_name!r} was created with a different set-up ({diff}); "
                      "continue it with its own options, or give a new --study name")


def _show(key: str, value) -> str:
    if key == "subset" and value is None:  # None means all of the training split
        return "all 50,000 images"
    if key == "dataset":  # the name, and whether the files are the same
        return repr(value.get("name"))
    return repr(value)
