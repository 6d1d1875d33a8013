"""The `redis://` backend: one Redis primary carries every node's events, history and presence.

Layout in Redis (`P` is `key_prefix`, `E` the current epoch):

- `Pmeta` (hash): `epoch`, the one `seq` of the total order, and the current clock `bucket`.
  When it is lost (a flush, a restart without persistence, an eviction), the next script starts
  a new random epoch, so every old cursor gets `RESYNC_REQUIRED` and never a stale replay.
- `PE:u:<user>` and `PE:all` (streams): the history, entry id `<seq>-0`, fields `h` (the envelope
  head), `t` (milliseconds) and `p` (the seq of the previous entry of the same stream). The `p` of
  the oldest retained entry is the newest entry that was trimmed, which makes trimming exact.
- `PE:l:<user>` and `PE:lall` (strings): the last seq of a stream. They outlive the stream, so a
  stream that expired whole is told apart from one that never had an event after a cursor.
- `PE:clock` (sorted set): checkpoints `(time, seq)` that bound how far back those markers reach.
- `Pnode:<node id>` (hash) and `Pnodes` (sorted set): presence, refreshed by each node.
- `PE:c:<channel>` and `PE:lc:<channel>`: a channel's stream and marker, as for a user.
  `Pretained:<channel>` (hash `e`, `s`, `t`, `h`): its retained event, with no TTL.
- `Pmembers:<node id>`, `Pmember-nodes`, `Pcm:<channel>` and `Pcs`: channel members (see `_members`).

Pub/sub channels: `Pu:<user>`, `Pc:<channel>`, `Pall` and `Pctl`. A message is
`<epoch>|<seq>|<publish time in ms>|<user id length>|<user id><head>` (length -1 for the broadcast
stream; for a channel's, `c<name length>|<channel name><head>`).

Modules: `_backend` (the `RedisBackend` facade: publishing, history, commands), `_pubsub` (the one
pub/sub connection, its catch-up and heartbeat), `_presence` (cluster-wide connection counts),
`_members` (cluster-wide channel members), and `_scripts` with the `.lua` files.
"""

from __future__ import annotations

from ._backend import RedisBackend

__all__ = ["RedisBackend"]
