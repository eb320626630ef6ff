"""The base every layer shares: paths, the result cache, atomic checkpoint folders, the hub's offline switch, the
component vocabulary and hook runner, bootstrap intervals."""
