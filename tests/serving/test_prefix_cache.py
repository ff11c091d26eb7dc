"""The prefix-state cache on its own: longest-prefix lookup, where prompts part, LRU eviction by bytes."""

from spikelm.serving.prefix_cache import KEY_BYTES_PER_TOKEN, PrefixStateCache


def _cache(max_bytes):
    # a state here is a list of numbers, 100 bytes each, so sizes are easy to count by hand
    return PrefixStateCache(max_bytes, lambda state: 100 * len(state))


def test_longest_cached_prefix_and_where_prompts_part():
    cache = _cache(10_000)
    cache.insert([1, 2, 3], ["abc"])
    cache.insert([1, 2, 3, 4, 5], ["abcde"])
    match = cache.lookup([1, 2, 3, 4, 5, 6], limit=5)
    assert (match.length, match.state, match.shared) == (5, ["abcde"], 5)
    match = cache.lookup([1, 2, 3, 4, 9], limit=4)  # parts from the longer key after 4 tokens
    assert (match.length, match.state, match.shared) == (3, ["abc"], 4)
    match = cache.lookup([1, 2, 3, 4, 5], limit=4)  # the limit keeps at least one token to run
    assert match.length == 3
    match = cache.lookup([7, 8], limit=1)
    assert (match.length, match.state, match.shared) == (0, None, 0)
    assert (cache.hits, cache.misses, cache.hit_tokens) == (3, 1, 5 + 3 + 3)


def test_lookup_returns_a_copy():
    cache = _cache(10_000)
    cache.insert([1, 2], ["state"])
    cache.lookup([1, 2, 3], limit=2).state.append("changed by a request")
    assert cache.lookup([1, 2, 3], limit=2).state == ["state"]


def test_split_keys_and_least_recently_used_eviction_by_bytes():
    entry = 100 + 3 * KEY_BYTES_PER_TOKEN  # one state of one item under a 3-token key
    cache = _cache(3 * entry)
    for key in ([1, 2, 3], [1, 2, 4], [1, 5, 6]):
        cache.insert(key, [key[-1]])
    assert len(cache) == 3 and cache.bytes == 3 * entry
    cache.lookup([1, 2, 3, 0], limit=3)  # [1, 2, 3] is now the most recently used
    cache.insert([7, 8, 9], [9])  # over budget: the least recently used, [1, 2, 4], leaves
    assert len(cache) == 3 and cache.bytes == 3 * entry and cache.evictions == 1
    assert cache.lookup([1, 2, 4, 0], limit=3).length == 0
    assert cache.lookup([1, 2, 3, 0], limit=3).state == [3]
    assert cache.lookup([1, 5, 6, 0], limit=3).state == [6]
    # the evicted key's branch is gone from the tree: that prompt now shares only [1, 2] with a key
    assert cache.lookup([1, 2, 4, 0], limit=3).shared == 2


def test_an_evicted_inner_key_leaves_its_longer_keys_reachable():
    cache = _cache(10_000)
    cache.insert([1, 2], ["short"])
    cache.insert([1, 2, 3, 4], ["long"])
    cache._evict(cache.root.children[1])  # the node of [1, 2]: it has no state now and one child, merged
    assert len(cache.root.children) == 1 and cache.root.children[1].edge == (1, 2, 3, 4)
    assert cache.lookup([1, 2, 3, 4, 5], limit=4).state == ["long"]
    assert cache.lookup([1, 2, 9], limit=2).length == 0


def test_a_state_larger_than_the_budget_is_not_kept():
    cache = _cache(150)
    cache.insert([1, 2], ["a", "b"])  # 200 bytes + its key
    assert len(cache) == 0 and cache.bytes == 0
