"""The base every layer shares: paths, the result cache, the component vocabulary and hook runner, bootstrap intervals."""
