"""The message broker: the only package that imports `broadcaster`.

Ticks go out with `Broker.publish` on `prices:{SYMBOL}` (`price_channel`) and come back to
the fan-out hub through `Broker.subscribe_bursts`: a `BurstSink` called with each read's
messages, from the read itself. The `BurstSubscription` it yields takes channels on and off
while it runs (an instrument added or disabled), the others' delivery untouched.

What is broadcaster's. Only its public names (`broadcaster/__init__.py` exports `Broadcast`,
`BroadcastBackend` and `Event`, in 0.3.1 and on its main branch alike): our backends implement
the `BroadcastBackend` contract, `Broadcast(backend=...)` connects, disconnects and publishes
through them, and the memory backend queues `Event`s. Nothing here imports a private module of
broadcaster (`broadcaster._base`; `broadcaster._backends`, which its main branch renames
`broadcaster.backends`) or touches a private attribute of `Broadcast`.

What is ours, and why: the public surface cannot carry it.

* The backends (backends.py), subclassing `BroadcastBackend` itself, not broadcaster's own
  backends (private modules, moved on main). Its Redis backend (0.3.1, unchanged on main) wakes
  its listener before SUBSCRIBE is sent, so with redis-py 8 the listener finds nothing
  subscribed, and delivers nothing, ever; its listener dies silently when Redis drops or
  restarts (encode/broadcaster#144, open; its maintainers would rather not reconnect in
  backends, #121) and raises on a non-UTF-8 payload. Ours subscribes on a connection of its
  own (redis_wire.py: hiredis, ~170 µs of CPU a message less than redis-py's PubSub),
  subscribes before it listens, reconnects with jittered backoff and resubscribes, pings a
  quiet connection and drops a silent one, and drops undecodable payloads. Its memory
  backend's queue is unbounded; ours (a screenful) is bounded.
* The delivery (fanout.py, and the per-channel locks in broker.py). `Broadcast.subscribe`
  gives every subscriber an unbounded queue, all filled by one listener task (were they
  bounded, one full queue would stall every subscriber), and two concurrent subscribes to a
  new channel lose one of them (it awaits the backend before registering the queue). Changing
  either means overriding `Broadcast`'s private `_subscribers` and `_listener`, as the old
  app/broker.py did. And the hub wants each read's messages handed over from the read itself:
  broadcaster's two queue-and-task hops cost a tick ~45 µs of server CPU
  (`python -m bench.tickcost`, docs/performance.md). So the backends hand messages to our
  fan-out; `Broadcast.subscribe` is not used, and `Broadcast`'s listener task waits on
  `next_published`, which our backends never complete, until disconnect cancels it.

Nothing is queued on the Redis path: a read's messages are handed over before the next read,
and what the process has not read yet waits in Redis, up to its pubsub output-buffer limit,
past which Redis drops the connection and we resubscribe (the hub refetches the gap from the
store). memory:// holds at most `queue_size` messages; past it `publish` waits.
"""

from app.broker.broker import Broker, BurstSubscription, price_channel
from app.broker.fanout import BurstSink

__all__ = ["Broker", "BurstSink", "BurstSubscription", "price_channel"]
