"""Process groups and collectives (:mod:`.dist`) and the Newton-Schulz partition over ranks (:mod:`.ns_partition`);
nothing here knows about training."""
