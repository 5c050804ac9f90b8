-- Per shard: written samples, their faces, and faces per sample
SELECT
    shard,
    count(*) AS samples,
    CAST(sum(num_faces) AS BIGINT) AS faces,
    round(avg(num_faces), 2) AS faces_per_sample
FROM metadata
GROUP BY shard
ORDER BY shard;
