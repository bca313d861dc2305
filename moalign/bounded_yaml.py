"""YAML written by users (config files, ``key=value`` overrides, saved configs, study files), read safely.

``yaml.safe_load`` builds no Python objects but its own, yet it keeps aliases as shared references: a few hundred bytes
of nested aliases ("billion laughs") load as a small graph that expands to billions of nodes as soon as anything walks
it (validation, copying, printing an error). ``load`` measures the document as it would be expanded before building
it, and refuses one above ``MAX_NODES`` nodes, a recursive alias, or nesting deeper than Python's recursion limit.
A real config has a few hundred nodes; a study file a few thousand.
"""

from __future__ import annotations

from typing import Any

import yaml

from moalign.errors import UserError

MAX_NODES = 100_000


class _TooLarge(Exception):
    pass


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes of ``node`` once every alias is expanded (each distinct node measured once: ``sizes``)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _TooLarge("it holds a recursive alias (a node that contains itself)")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
                    for k, v in node.value)
    open_nodes.discard(key)
    if size > MAX_NODES:
        raise _TooLarge(f"it expands to more than {MAX_NODES} nodes (aliases repeat what they point to)")
    sizes[key] = size
    return size


def load(text: str, source: str) -> Any:
    """The document in ``text`` (``source`` names it in errors). yaml.YAMLError for malformed YAML, as
    ``yaml.safe_load``; UserError for a document too large once expanded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except _TooLarge as exc:
        raise UserError(f"{source} is refused: {exc}; write the values out instead of nesting aliases") from None
    except RecursionError:
        raise UserError(f"{source} is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()
