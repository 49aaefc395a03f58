"""apo-ray config: the resolved config (defaults <- --recipe <- --config <- overrides) as YAML, or every key with its doc."""

from __future__ import annotations

import argparse

from apo_ray.cli import add_recipe_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config, or list every key (--keys)",
                       description="Print the config a command would run with: the defaults, overridden by "
                                   "--config, overridden by KEY=VALUE, validated, as YAML. With --keys, list every "
                                   "key with its default and what it does.")
    p.add_argument("--config", metavar="FILE", help="YAML file of overrides of the defaults")
    p.add_argument("--keys", action="store_true", help="list every key with its default and doc instead")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")
    add_recipe_arg(p)
    p.set_defaults(func=run)


def keys_text() -> str:
    from apo_ray.config import describe_keys

    lines, section = [], None
    for key, default, doc in describe_keys():
        sec = key.split(".")[0]
        if sec != section:
            lines.append(("\n" if section else "") + f"{sec}:")
            section = sec
        lines.append(f"  {key} = {_yaml_value(default)}")
        lines.append(f"      {doc}")
    return "\n".join(lines)


def _yaml_value(v: object) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").strip()


def run(args: argparse.Namespace) -> int:
    import yaml

    from apo_ray import config

    if args.keys:
        if args.config or args.overrides or args.recipe:
            from apo_ray.cli import usage_error

            raise usage_error("--keys lists the defaults; it takes no --config or overrides",
                              "drop --keys to print the resolved config")
        print(keys_text())
        return 0
    cfg = config.load(args.config, args.overrides, recipe_name=args.recipe)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False), end="")
    return 0
