"""``await`` support for Transfer and ImmCounter (used by their ``__await__``).

The engine's thread signals completion through ``loop.call_soon_threadsafe``;
no thread is parked per awaited handle.
"""

import asyncio


def _settle(future):
    if not future.done():
        future.set_result(None)


def _waker(loop, future):
    def wake(*_args):
        try:
            loop.call_soon_threadsafe(_settle, future)
        except RuntimeError:
            # The loop was closed before the request ended: nobody awaits.
            pass

    return wake


async def wait_transfer(transfer):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    transfer.add_done_callback(_waker(loop, future))
    await future
    transfer.wait(0)


async def wait_counter(counter):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    counter._add_waker(_waker(loop, future))
    await future
    counter.wait(0)
