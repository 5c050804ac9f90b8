-- Histogram of faces per written image (num_faces)
SELECT
    num_faces,
    count(*) AS images,
    round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct
FROM metadata
GROUP BY num_faces
ORDER BY num_faces;
