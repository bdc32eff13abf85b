"""moecache inside other engines: each module here plugs moecache's expert kernels and expert cache into an
engine through that engine's own extension points, and is imported only by the engine (never by moecache)."""
