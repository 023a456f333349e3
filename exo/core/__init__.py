"""The vocabulary every floor shares: events, state, bus messages, model info. Pure: no I/O."""
