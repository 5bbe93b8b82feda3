"""pledge-sim: simulated BRSKI pledges (RFC 8995) that find a join proxy and enroll through it."""
