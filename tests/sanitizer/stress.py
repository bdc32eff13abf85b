"""Multi-threaded ExpertCache stress run for a ThreadSanitizer build of moecache._C (see run_tsan.sh)."""
import random
import threading

import torch

import moecache
from moecache.cache import ExpertCache

assert moecache._C.build_info()["sanitizer"] == "thread", "not a ThreadSanitizer build"
L,E=4,16
layers=[(torch.randn(E,16,16), torch.randn(E,16,8)) for _ in range(L)]
cache=ExpertCache(layers, num_slots=10, policy="lfu")
def worker(seed):
    rng=random.Random(seed)
    for _ in range(300):
        layer=rng.randrange(L)
        ex=rng.sample(range(E), rng.randint(1,4))
        if rng.random()<0.4: cache.prefetch(rng.randrange(L), rng.sample(range(E),3))
        lease=cache.ensure(layer, ex)
        g,d=cache.slot_weights()
        for e,s in zip(ex, lease.slots):
            if s>=0: assert torch.equal(g[s], layers[layer][0][e])
        cache.stats(); lease.release()
ts=[threading.Thread(target=worker,args=(i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
cache.close()
for _ in range(20):
    c=ExpertCache(layers, num_slots=3); c.prefetch(0,[1,2,3]); c.close()
print("stress done")
