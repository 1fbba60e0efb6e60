"""What every layer shares and no layer owns: errors, the key layout, script handles,
retention and storage URLs. It imports nothing else of ratelimitd, so api, engine,
storage and settings can all depend on it without depending on each other."""
