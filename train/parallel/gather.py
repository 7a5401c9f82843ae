"""A pipelined run's optimiser and scheduler state, by parameter name, for the one checkpoint format.

A pipeline rank holds a slice of the model and an optimiser over that slice only. To
save, the ranks of the first data-parallel replica send rank 0 their weights and their
optimiser state keyed by parameter *name*; rank 0 assembles the state dict of the whole
CaptionModel and the optimiser state in the layout the unpipelined AdamW would have (its
parameter groups, in `train.optim.param_groups` order), and train/checkpoints.py writes
it like any other. Loading is the reverse: each rank takes its tensors and its parameters'
optimiser entries by name. So the pipeline layout (stages, schedule, replicas) may
change between save and resume, and plain checkpoints and pipelined ones are
interchangeable. The cost is one gather of weights + optimiser state per save on rank
0, as the FSDP path has.
"""

from __future__ import annotations

from lm.config import CheckpointError

PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")  # LR-scheduler entries that hold one value per group


def param_names(opt, parts) -> list[str]:
    """Names of the optimiser's parameters in its state-dict index order."""
    name_of = {id(p): n for n, p in parts.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def named_optim_state(opt, parts) -> dict:
    sd, names = opt.state_dict(), param_names(opt, parts)
    return {"state": {names[i]: s for i, s in sd["state"].items()},
            "groups": [({k: v for k, v in g.items() if k != "params"}, [names[i] for i in g["params"]])
                       for g in sd["param_groups"]]}


def full_optim_state(pieces: list[dict], full_groups: list[list[str]]) -> dict:
    """The unpipelined optimiser's state dict from every rank's named piece."""
    state, hyper = {}, {}
    for piece in pieces:
        state.update(piece["state"])
        hyper.update({n: h for h, names in piece["groups"] for n in names})
    index = {n: i for i, n in enumerate(n for names in full_groups for n in names)}
    return {"state": {index[n]: s for n, s in state.items()},
            "param_groups": [dict(hyper[names[0]], params=[index[n] for n in names]) for names in full_groups]}


def load_optim_state(opt, parts, saved: dict, full_groups: list[list[str]], source: str) -> None:
    """This rank's share of an unpipelined optimiser state dict, matched by parameter name."""
    flat = [n for names in full_groups for n in names]
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if saved_sizes != [len(names) for names in full_groups]:
        raise CheckpointError(f"{source}: optimiser groups of sizes {saved_sizes} do not match this model's "
                              f"{[len(n) for n in full_groups]} (a different model or optim config?)")
    by_name = {flat[i]: s for i, s in saved["state"].items()}
    group_of = {flat[i]: g for g in saved["param_groups"] for i in g["params"]}
    own, names = opt.state_dict(), param_names(opt, parts)
    opt.load_state_dict({
        "state": {i: by_name[n] for i, n in enumerate(names) if n in by_name},
        "param_groups": [dict({k: v for k, v in group_of[names[g["params"][0]]].items() if k != "params"},
                              params=g["params"]) for g in own["param_groups"]],
    })


def _full_group_index(groups: list[tuple[dict, list[str]]], full_groups: list[list[str]]) -> list[int]:
    """For each of a rank's optimiser groups, the index of the full model's group it is part of."""
    index = {n: i for i, names in enumerate(full_groups) for n in names}
    return [index[names[0]] for _, names in groups]


def full_sched_state(pieces: list[dict], full_groups: list[list[str]]) -> dict:
    """The LR scheduler's state with its per-group lists laid out over the full model's groups."""
    found = {}
    for piece in pieces:
        for j, i in enumerate(_full_group_index(piece["optim"]["groups"], full_groups)):
            found[i] = (piece["sched"], j)
    out = dict(pieces[0]["sched"])
    for key in PER_GROUP:
        if key in out:
            out[key] = [found[i][0][key][found[i][1]] for i in range(len(full_groups))]
    return out


def load_sched_state(sched, opt, parts, saved: dict, full_groups: list[list[str]]) -> None:
    mine = _full_group_index(named_optim_state(opt, parts)["groups"], full_groups)
    sched.load_state_dict({k: [v[i] for i in mine] if k in PER_GROUP else v for k, v in saved.items()})
