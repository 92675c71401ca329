// Print the broker's request counts by request type, one "<type> <count>" per line, from its JMX
// (kafka.network RequestMetrics RequestsPerSec, summed over versions). Run as a single-file
// program: `java bench/BrokerRequests.java <jmx port>`, against a broker started with
// KAFKA_JMX_PORT (scripts/kafka.sh). Used by bench/broker_requests.py.
import java.util.Map;
import java.util.TreeMap;
import javax.management.MBeanServerConnection;
import javax.management.ObjectName;
import javax.management.remote.JMXConnector;
import javax.management.remote.JMXConnectorFactory;
import javax.management.remote.JMXServiceURL;

public class BrokerRequests {
    public static void main(String[] args) throws Exception {
        String url = "service:jmx:rmi:///jndi/rmi://127.0.0.1:" + args[0] + "/jmxrmi";
        try (JMXConnector connector = JMXConnectorFactory.connect(new JMXServiceURL(url))) {
            MBeanServerConnection server = connector.getMBeanServerConnection();
            ObjectName pattern =
                new ObjectName("kafka.network:type=RequestMetrics,name=RequestsPerSec,*");
            Map<String, Long> counts = new TreeMap<>();
            for (ObjectName name : server.queryNames(pattern, null)) {
                long count = ((Number) server.getAttribute(name, "Count")).longValue();
                counts.merge(name.getKeyProperty("request"), count, Long::sum);
            }
            counts.forEach((request, count) -> System.out.println(request + " " + count));
        }
    }
}
