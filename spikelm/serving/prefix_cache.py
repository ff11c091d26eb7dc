"""The prefix-state cache: recurrent states of prompt prefixes, keyed by their token ids, bounded in bytes.

A spiking model's whole context is a fixed-size state, so the state after a shared prefix (a system prompt,
a few-shot header, the previous turns of a chat) is one snapshot of a few hundred KiB to a few MiB whatever
the prefix's length, and it is exact at any token, not only at block boundaries as in a KV-cache server.

Keys live in a radix tree (token-id edges, a node where two keys part; the idea of SGLang's RadixAttention,
Zheng et al. 2024, applied to recurrent states): `lookup` walks a prompt down the tree once and finds both
the longest prefix that has a snapshot and the longest prefix shared with any key (where the engine takes a
new snapshot, so that a third prompt with the same start resumes there). Snapshots leave least recently
used first when their bytes (plus 8 bytes per key token) exceed the budget.
"""

import collections
import copy
from dataclasses import dataclass

KEY_BYTES_PER_TOKEN = 8  # what a key's token costs in the budget (the tree's edges hold Python ints)


class _Node:
    __slots__ = ("edge", "children", "parent", "state", "state_bytes")

    def __init__(self, edge: tuple, parent):
        self.edge = edge  # the token ids from the parent to this node
        self.children: dict[int, _Node] = {}  # by the first token of the child's edge
        self.parent = parent
        self.state = None  # the cache after the tokens from the root to here, or None
        self.state_bytes = 0


@dataclass
class PrefixMatch:
    length: int  # tokens covered by `state` (0: nothing cached)
    state: object | None  # a private copy of the cached state, or None
    shared: int  # the longest prefix this prompt shares with any key in the cache


class PrefixStateCache:
    """An LRU of prompt-prefix states, bounded by `max_bytes`. Not thread-safe: the engine thread owns it."""

    def __init__(self, max_bytes: int, state_bytes):
        self.max_bytes = max_bytes
        self.state_bytes = state_bytes  # state -> its size in bytes
        self.root = _Node((), None)
        self._lru: collections.OrderedDict[_Node, None] = collections.OrderedDict()  # nodes with a state
        self.bytes = 0
        self.hits = self.misses = self.hit_tokens = self.evictions = 0

    def __len__(self):
        return len(self._lru)

    def lookup(self, ids, limit: int) -> PrefixMatch:
        """The longest cached prefix of `ids` no longer than `limit` tokens (a copy of its state)."""
        node, depth, best, best_depth = self.root, 0, None, 0
        while depth < len(ids):
            child = node.children.get(ids[depth])
            if child is None:
                break
            common = _common_length(child.edge, ids, depth)
            if common < len(child.edge):  # the prompt leaves this edge part of the way along
                depth += common
                break
            node, depth = child, depth + common
            if node.state is not None and depth <= limit:
                best, best_depth = node, depth
        if best is None:
            self.misses += 1
            return PrefixMatch(0, None, depth)
        self.hits += 1
        self.hit_tokens += best_depth
        self._lru.move_to_end(best)
        return PrefixMatch(best_depth, copy.deepcopy(best.state), depth)

    def insert(self, ids, state):
        """Keep a copy of `state`, the state after `ids`. A snapshot larger than the whole budget is not kept."""
        size = self.state_bytes(state) + KEY_BYTES_PER_TOKEN * len(ids)
        if size > self.max_bytes or not ids:
            return
        node = self._node_for(tuple(ids))
        if node.state is not None:  # already cached (two requests with the same prompt): refresh it
            self._lru.move_to_end(node)
            return
        node.state, node.state_bytes = copy.deepcopy(state), size
        self._lru[node] = None
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._evict(next(iter(self._lru)))

    def _node_for(self, ids: tuple) -> _Node:
        """The node for exactly `ids`, splitting an edge or adding a leaf as needed."""
        node, depth = self.root, 0
        while depth < len(ids):
            child = node.children.get(ids[depth])
            if child is None:
                leaf = _Node(ids[depth:], node)
                node.children[ids[depth]] = leaf
                return leaf
            common = _common_length(child.edge, ids, depth)
            if common < len(child.edge):  # split the edge where the keys part
                middle = _Node(child.edge[:common], node)
                node.children[ids[depth]] = middle
                child.edge, child.parent = child.edge[common:], middle
                middle.children[child.edge[0]] = child
                child = middle
            node, depth = child, depth + common
        return node

    def _evict(self, node: _Node):
        del self._lru[node]
        self.bytes -= node.state_bytes
        node.state, node.state_bytes = None, 0
        self.evictions += 1
        # drop nodes that lead nowhere any more, and merge a stateless node into its only child
        while node is not self.root and node.state is None and len(node.children) <= 1:
            parent = node.parent
            del parent.children[node.edge[0]]
            if node.children:
                (child,) = node.children.values()
                child.edge, child.parent = node.edge + child.edge, parent
                parent.children[child.edge[0]] = child
            node = parent


def _common_length(edge: tuple, ids, start: int) -> int:
    """How many tokens of `edge` equal ids[start:...]."""
    n = min(len(edge), len(ids) - start)
    i = 0
    while i < n and edge[i] == ids[start + i]:
        i += 1
    return i
