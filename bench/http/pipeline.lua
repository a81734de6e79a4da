-- wrk script: 16 requests per write (HTTP pipelining), as in the pipelined
-- plaintext test of issue 4. wrk counts every response; it sends the next
-- batch on a connection once all 16 answers of the last one have arrived.
--   wrk -s pipeline.lua http://127.0.0.1:PORT/

init = function(args)
  local depth = 16
  local r = {}
  for i = 1, depth do
    r[i] = wrk.format()
  end
  req = table.concat(r)
end

request = function()
  return req
end
