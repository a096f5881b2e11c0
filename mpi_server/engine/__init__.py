"""The serving engine: sequences, block manager, scheduler, sampler, output processing, the engine
loop and its async front, and the executor boundary it drives."""
